"""Search spaces as data: YAML validated by a schema, translated into an Optuna define-by-run.

A space file::

    name: smoke
    metric: refined_miou          # what the search maximises
    mode: max
    base: {data.name: synthetic, train.epochs: 2}     # fixed keys for every trial
    params:                                           # searched keys (dotted TrialConfig keys)
      refiner.kind: {choice: [none, cspn, dyspn]}
      optim.lr: {float: [1.0e-4, 3.0e-3], log: true}
    when:                                             # conditional branches
      refiner.kind:
        cspn:  {refiner.kernel_size: {choice: [3, 5, 7]}}
        dyspn: {refiner.kernel_size: {choice: [5, 7]}}
    points_to_evaluate:                               # seed configurations (Optuna names)
      - {refiner.kind: cspn, cspn.kernel_size: 3}

Branch parameters get branch-specific Optuna names (``cspn.kernel_size``) because Optuna
cannot change a categorical's choices between branches. ``define_by_run`` only suggests
values; ``to_trial_config`` maps the suggested names back onto a flat trial config.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spntune.config import ConfigError, TrialConfig, flatten, read_yaml, unflatten

__all__ = ["BUILTIN_SPACES", "Param", "SearchSpace", "builtin_space_path", "load_space"]

_SPACES_DIR = Path(__file__).parent / "search_spaces"
BUILTIN_SPACES = ("smoke", "pets", "voc", "camvid")
_MAX_ENUMERATED = 64  # int ranges up to this size are checked value by value


class Param(BaseModel):
    """One searched dimension: exactly one of ``choice``, ``int``, ``float`` or ``value``."""

    # allow_inf_nan=False: range bounds and steps are finite numbers (a trial cannot use .inf)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    choice: list[Any] | None = None
    int_range: tuple[int, int] | None = Field(None, alias="int")
    float_range: tuple[float, float] | None = Field(None, alias="float")
    value: Any = None
    log: bool = False
    step: float | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Param:
        kinds = [k for k in ("choice", "int_range", "float_range") if getattr(self, k) is not None]
        if len(kinds) + ("value" in self.model_fields_set) != 1:
            raise ValueError("give exactly one of choice: [...], int: [low, high], float: [low, high], value: x")
        if self.choice is not None and not self.choice:
            raise ValueError("choice needs at least one option")
        for rng in (self.int_range, self.float_range):
            if rng is not None:
                low, high = rng
                if low > high:
                    raise ValueError(f"low > high ({low} > {high})")
                if self.log and low <= 0:
                    raise ValueError(f"log scale needs low > 0, got {low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined (Optuna)")
        if self.step is not None and self.step <= 0:
            raise ValueError(f"step must be > 0, got {self.step}")
        if self.int_range is not None and self.step is not None and not float(self.step).is_integer():
            raise ValueError(f"step of an int range must be a whole number, got {self.step}")
        if (self.log or self.step is not None) and self.int_range is None and self.float_range is None:
            raise ValueError("log/step apply to int or float ranges only")
        return self

    @property
    def kind(self) -> Literal["choice", "int", "float", "value"]:
        if self.choice is not None:
            return "choice"
        if self.int_range is not None:
            return "int"
        if self.float_range is not None:
            return "float"
        return "value"

    def candidates(self) -> list[Any]:
        """Values to check against the trial config schema (all of them where feasible)."""
        if self.kind == "choice":
            return list(self.choice or [])
        if self.kind == "int":
            low, high = self.int_range  # type: ignore[misc]
            step = int(self.step or 1)
            count = (high - low) // step + 1  # counted, not listed: a range may span 10**11 values
            if count <= _MAX_ENUMERATED:
                return list(range(low, high + 1, step))
            return [low, low + (count - 1) * step]  # the ends Optuna can suggest
        if self.kind == "float":
            return list(self.float_range)  # type: ignore[arg-type]
        return [self.value]

    def refuses(self, value: Any) -> str:
        """Why Optuna cannot take ``value`` for this dimension (a seed point's value), '' if it can."""
        if self.kind == "choice":
            options = self.choice or []
            # Optuna finds a point's option by ==, so 1 == 1.0 == True; bools are kept apart from numbers
            if not any(value == c and isinstance(value, bool) == isinstance(c, bool) for c in options):
                return f"is not one of its choices {options}"
            return ""
        if self.kind == "value":
            return "" if value == self.value else f"differs from its fixed value {self.value!r}"
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.kind == "int" and not (number and float(value).is_integer()):
            return "is not an integer"
        if not number or not math.isfinite(value):
            return "is not a finite number"
        low, high = self.int_range if self.kind == "int" else self.float_range  # type: ignore[misc]
        if not low <= value <= high:
            return f"is outside its range [{low}, {high}]"
        if self.step is not None:
            steps = (value - low) / self.step
            if abs(steps - round(steps)) > 1e-8:  # Optuna's own tolerance
                step = int(self.step) if self.kind == "int" else self.step
                return f"is not on its grid of step {step} from {low}"
        return ""

    def _optuna(self) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
        """The one switch over kinds: Optuna's ``suggest_<kind>`` / ``<Kind>Distribution`` arguments."""
        if self.kind == "choice":
            return "categorical", (self.choice,), {}
        if self.kind == "int":
            return "int", tuple(self.int_range), {"step": int(self.step or 1), "log": self.log}  # type: ignore[arg-type]
        return "float", tuple(self.float_range), {"step": self.step, "log": self.log}  # type: ignore[arg-type]

    def suggest(self, trial: Any, name: str) -> Any:
        """Ask an Optuna trial for this dimension under ``name`` (a fixed ``value`` is not asked)."""
        if self.kind == "value":
            return self.value
        kind, args, kwargs = self._optuna()
        return getattr(trial, f"suggest_{kind}")(name, *args, **kwargs)

    def distribution(self) -> Any:
        """The Optuna distribution ``suggest`` samples from (None for a fixed ``value``)."""
        if self.kind == "value":
            return None
        import optuna.distributions as d  # only the end-of-search plots need it

        kind, args, kwargs = self._optuna()
        return {"categorical": d.CategoricalDistribution, "int": d.IntDistribution,
                "float": d.FloatDistribution}[kind](*args, **kwargs)  # fmt: skip


class SearchSpace(BaseModel):
    """A validated search space. Build with ``load_space(path)``."""

    model_config = ConfigDict(extra="forbid")

    name: str = "search"
    metric: str = "refined_miou"
    mode: Literal["max", "min"] = "max"
    base: dict[str, Any] = Field(default_factory=dict)
    params: dict[str, Param] = Field(default_factory=dict)
    when: dict[str, dict[str, dict[str, Param]]] = Field(default_factory=dict)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("metric")
    @classmethod
    def _reported_metric(cls, v: str) -> str:
        from spntune.leaderboard import TRIAL_METRICS, is_trial_metric  # leaderboard imports this module

        if not is_trial_metric(v):
            raise ValueError(
                f"{v!r} is not a metric trials report; valid: {', '.join(TRIAL_METRICS)}, coarse_iou_<class>, "
                "refined_iou_<class>, refined_miou_t<step>, and final_<any of these> (original size)"
            )
        return v

    @field_validator("when", mode="before")
    @classmethod
    def _branch_values_as_text(cls, v: Any) -> Any:
        """Branches are matched by the text of the suggested value (``define_by_run``), so a branch written
        ``2:`` or ``true:`` (YAML's int and bool keys) is the branch of the value 2 or True."""
        if not isinstance(v, dict):
            return v
        return {
            cond: {_as_text(value): params for value, params in branches.items()} if isinstance(branches, dict)
            else branches
            for cond, branches in v.items()
        }  # fmt: skip

    # ----------------------------------------------------------------- names

    def branch_name(self, value: Any, key: str) -> str:
        """Optuna name of a branch parameter: ``cspn.kernel_size`` for ``refiner.kernel_size``."""
        return f"{value}.{key.rsplit('.', 1)[-1]}"

    def named_params(self) -> dict[str, Param]:
        """Every Optuna parameter name (top-level key or ``<branch value>.<last key part>``) -> its ``Param``."""
        named = dict(self.params)
        for branches in self.when.values():
            for value, params in branches.items():
                named |= {self.branch_name(value, key): p for key, p in params.items()}
        return named

    def optuna_to_config_key(self) -> dict[str, str]:
        """Every Optuna parameter name -> the dotted trial-config key it sets."""
        mapping = {key: key for key in self.params}
        for branches in self.when.values():
            for value, params in branches.items():
                for key in params:
                    mapping[self.branch_name(value, key)] = key
        return mapping

    def distributions(self) -> dict[str, Any]:
        """Every searched Optuna name -> its distribution (fixed values left out)."""
        named = list(self.params.items())
        for branches in self.when.values():
            for value, params in branches.items():
                named += [(self.branch_name(value, key), p) for key, p in params.items()]
        return {name: p.distribution() for name, p in named if p.kind != "value"}

    # ----------------------------------------------------------------- translation

    def define_by_run(self, trial: Any) -> None:
        """Optuna define-by-run: suggests values only, builds nothing."""
        chosen: dict[str, Any] = {}
        for key, param in self.params.items():
            chosen[key] = param.suggest(trial, key)
        for cond_key, branches in self.when.items():
            value = chosen.get(cond_key, _get(self.base, cond_key))
            for key, param in branches.get(str(value), {}).items():
                param.suggest(trial, self.branch_name(value, key))

    def to_trial_config(self, suggested: dict[str, Any]) -> dict[str, Any]:
        """Flat trial config: base, then each suggested value under its config key."""
        mapping = self.optuna_to_config_key()
        config = flatten(unflatten(dict(self.base)))
        for name, value in suggested.items():
            if name not in mapping:
                raise ConfigError(f"search produced unknown parameter {name!r}; known: {sorted(mapping)}")
            config[mapping[name]] = value
        return config

    # ----------------------------------------------------------------- validation

    @model_validator(mode="after")
    def _check_against_trial_config(self) -> SearchSpace:
        errors = self._structure_errors() + self._value_errors({})
        if errors:
            raise ValueError("\n".join(errors))
        return self

    def check_overrides(self, overrides: dict[str, Any]) -> None:
        """Refuse ``--set`` overrides under which some of this space's trials would not validate.

        A trial runs ``{**base, **suggested, **overrides}`` (``tune.trial_config``): an override replaces a
        searched value, while the ``when:`` branches still follow the value Optuna suggested. So
        ``--set refiner.kind=none`` on a space whose ``cspn`` branch searches ``refiner.channels`` would
        fail every trial; here it is refused before anything starts, naming the ``--set`` key and the
        space's parameter.

        Raises:
            ConfigError: listing each parameter (with the value and branch) that the overrides invalidate.
        """
        if not overrides:
            return
        errors = self._value_errors(overrides, hints=False)
        if not errors:
            return
        base_fails = errors[0].startswith("base: ")
        if base_fails:  # every parameter line would repeat it
            errors = errors[:1]
        # The overrides to blame: those that break the space on their own (else all of them together)
        culprits = [k for k, v in overrides.items() if self._value_errors({k: v}, hints=False)] or list(overrides)
        searched = set(self.optuna_to_config_key().values())
        replaced = [k for k in culprits if k in searched]
        why = (
            f" (the space searches {', '.join(replaced)}: --set replaces each value suggested for it, while its "
            "when: branches still follow the suggested value)"
            if replaced and not base_fails
            else ""
        )
        sets = ", ".join(f"--set {k}={_yaml_text(overrides[k])}" for k in culprits)
        verb = "conflicts" if len(culprits) == 1 else "conflict"
        fix = "" if base_fails else "\n  drop the --set, or use a space that does not search these parameters"
        raise ConfigError(f"{sets} {verb} with search space {self.name!r}{why}:\n  " + "\n  ".join(errors) + fix)

    def _structure_errors(self) -> list[str]:
        """What is wrong with the space's shape: branches, seed points (independent of any override)."""
        errors: list[str] = []
        base_flat = flatten(unflatten(dict(self.base)))
        for cond_key, branches in self.when.items():
            if cond_key in self.params:
                options = [str(v) for v in self.params[cond_key].candidates()]
            elif cond_key in base_flat:
                options = [str(base_flat[cond_key])]
            else:
                errors.append(f"when {cond_key}: not a searched parameter or a base key")
                continue
            for value, params in branches.items():
                if value not in options:
                    errors.append(f"when {cond_key}: branch {value!r} is not one of its values {options}")
                names = [self.branch_name(value, k) for k in params]
                if len(set(names)) != len(names):
                    errors.append(f"when {cond_key}.{value}: two parameters share a last name component")
                for key in params:
                    if key in self.params:
                        errors.append(f"when {cond_key}.{value}: {key} is also a top-level param")
        named = self.named_params()
        for i, point in enumerate(self.points_to_evaluate):
            unknown = sorted(set(point) - set(named))
            if unknown:
                errors.append(f"points_to_evaluate[{i}]: unknown parameters {unknown}; known: {sorted(named)}")
            # Optuna takes a seed point's values as they are: an unknown option stops the search driver
            # mid-run, an out-of-range number is only warned about and then trained
            errors += [
                f"points_to_evaluate[{i}]: {name}: {value!r} {problem}"
                for name, value in point.items()
                if name in named and (problem := named[name].refuses(value))
            ]
        return errors

    def _value_errors(self, overrides: dict[str, Any], hints: bool = True) -> list[str]:
        """Every base value, searched value and seed point that does not validate as a trial config, with
        ``overrides`` applied last (as each trial applies ``--set``)."""
        errors: list[str] = []
        base_flat = flatten(unflatten(dict(self.base)))
        try:
            TrialConfig.from_dict({**base_flat, **overrides})
        except ConfigError as exc:
            errors.append(f"base: {_details(exc)}")
        # Each parameter alone first; then in combination with the others that are valid alone (so
        # one bad key is reported once, not again as the context of every other parameter).
        alone = {
            key: _first_invalid(key, param, [{}], base_flat, overrides, hints) for key, param in self.params.items()
        }
        errors += [error for error in alone.values() if error]
        valid = {key for key, error in alone.items() if not error}
        for key, param, contexts in self._params_in_context(base_flat, valid):
            error = _first_invalid(key, param, contexts, base_flat, overrides, hints)
            if error:
                errors.append(error)
        named = self.named_params()
        for i, point in enumerate(self.points_to_evaluate):
            if set(point) - set(named):
                continue  # a structure error
            try:
                TrialConfig.from_dict({**self.to_trial_config(point), **overrides})
            except ConfigError as exc:
                errors.append(f"points_to_evaluate[{i}]: {_details(exc)}")
        return errors

    def _params_in_context(
        self, base_flat: dict[str, Any], valid: set[str]
    ) -> list[tuple[str, Param, list[dict[str, Any]]]]:
        """Every parameter with the conditions it must hold under. A branch parameter: its branch's
        value. A top-level parameter that is ``valid`` alone: every value of every other (valid) choice,
        so that a ``refiner.channels`` searched for all trials is refused when ``refiner.kind`` can be
        ``none``, which takes no settings."""
        selectors = {k: p.candidates() for k, p in self.params.items() if p.kind == "choice" and k in valid}
        out: list[tuple[str, Param, list[dict[str, Any]]]] = []
        for cond_key, branches in self.when.items():
            values = selectors.get(cond_key) or [base_flat.get(cond_key)]
            for value, params in branches.items():
                typed = next((v for v in values if str(v) == value), value)
                out += [(key, param, [{cond_key: typed}]) for key, param in params.items()]
        top = [
            (key, param, [{k: v} for k, vs in selectors.items() if k != key for v in vs])
            for key, param in self.params.items()
            if key in valid
        ]
        return top + out


def _first_invalid(key: str, param: Param, contexts: list[dict[str, Any]], base_flat: dict[str, Any],
                   overrides: dict[str, Any], hints: bool = True) -> str:  # fmt: skip
    """The first ``(context, candidate)`` of a parameter that does not validate, as an error line ('' if none)."""
    for context in contexts:
        for candidate in param.candidates():
            try:
                TrialConfig.from_dict({**base_flat, **context, key: candidate, **overrides})
            except ConfigError as exc:
                detail = _details(exc)
                where = "".join(f" when {k}={v}" for k, v in context.items())
                hint = "".join(f" (search it under when: {k}: for the values that take it)" for k in context)
                return f"params {key}: value {candidate!r} is invalid{where}: {detail}{hint if hints else ''}"
    return ""


def _details(exc: ConfigError) -> str:
    """A trial-config error's lines (after its heading) as one line."""
    return "; ".join(line.strip() for line in str(exc).splitlines()[1:]) or str(exc)


def _as_text(value: Any) -> Any:
    """A ``when:`` branch key as the text ``define_by_run`` matches (``str`` of the suggested value)."""
    return str(value) if value is None or isinstance(value, (bool, int, float)) else value


def _yaml_text(value: Any) -> str:
    """A ``--set`` value as the user typed it (``none``, ``[64, 64]``), not as Python prints it."""
    return json.dumps(value) if not isinstance(value, str) else value


def _get(flat_or_nested: dict[str, Any], key: str) -> Any:
    return flatten(unflatten(dict(flat_or_nested))).get(key)


def builtin_space_path(name: str) -> Path:
    return _SPACES_DIR / f"{name}.yaml"


def load_space(path_or_name: str | Path) -> SearchSpace:
    """Load and validate a space file (or a built-in space by name: smoke, pets, voc, camvid).

    Raises:
        ConfigError: missing file, bad YAML, or a schema error naming the key.
    """
    if not str(path_or_name).strip():  # Path("") is ".", the current folder
        raise ConfigError(f"--space: empty path (an unset variable?); built-in spaces: {', '.join(BUILTIN_SPACES)}")
    path = Path(path_or_name)
    if not path.is_file() and str(path_or_name) in BUILTIN_SPACES:
        path = builtin_space_path(str(path_or_name))
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path} (built-in spaces: {', '.join(BUILTIN_SPACES)})")
    data = read_yaml(path, "search space") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"search space {path} must be a mapping")
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid search space {path}:\n" + _space_errors(exc)) from None


def _space_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p not in ("int_range", "float_range")]
        if len(loc) >= 2 and loc[-2] in ("int", "float") and loc[-1] in ("0", "1"):
            loc[-1] = ("low", "high")[int(loc[-1])]  # params.KEY.float.high, not .float.1
        key = ".".join(loc)
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] != "value_error" and not isinstance(err.get("input"), (dict, list)):
            msg += f" (got {err.get('input')!r})"
        lines.append(f"  {key}: {msg}" if key else "  " + msg.replace("\n", "\n  "))
    return "\n".join(lines)
