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

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spntune.config import ConfigError, TrialConfig, flatten, unflatten, yaml_error

__all__ = ["BUILTIN_SPACES", "Param", "SearchSpace", "builtin_space_path", "load_space"]

_SPACES_DIR = Path(__file__).parent / "search_spaces"
BUILTIN_SPACES = ("smoke", "pets", "voc", "camvid")
_MAX_ENUMERATED = 64  # int ranges up to this size are checked value by value


class Param(BaseModel):
    """One searched dimension: exactly one of ``choice``, ``int``, ``float`` or ``value``."""

    model_config = ConfigDict(extra="forbid")

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
            values = list(range(low, high + 1, step))
            return values if len(values) <= _MAX_ENUMERATED else [low, high]
        if self.kind == "float":
            return list(self.float_range)  # type: ignore[arg-type]
        return [self.value]

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

    # ----------------------------------------------------------------- names

    def branch_name(self, value: Any, key: str) -> str:
        """Optuna name of a branch parameter: ``cspn.kernel_size`` for ``refiner.kernel_size``."""
        return f"{value}.{key.rsplit('.', 1)[-1]}"

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
        errors: list[str] = []
        try:
            TrialConfig.from_dict(self.base)
        except ConfigError as exc:
            errors.append(f"base: {exc}")
        base_flat = flatten(unflatten(dict(self.base)))
        # Each parameter alone first; then in combination with the others that are valid alone (so
        # one bad key is reported once, not again as the context of every other parameter).
        alone = {key: _first_invalid(key, param, [{}], base_flat) for key, param in self.params.items()}
        errors += [error for error in alone.values() if error]
        valid = {key for key, error in alone.items() if not error}
        for key, param, contexts in self._params_in_context(base_flat, valid):
            error = _first_invalid(key, param, contexts, base_flat)
            if error:
                errors.append(error)
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
        mapping = self.optuna_to_config_key()
        for i, point in enumerate(self.points_to_evaluate):
            unknown = sorted(set(point) - set(mapping))
            if unknown:
                errors.append(f"points_to_evaluate[{i}]: unknown parameters {unknown}; known: {sorted(mapping)}")
                continue
            try:
                TrialConfig.from_dict(self.to_trial_config(point))
            except ConfigError as exc:
                errors.append(f"points_to_evaluate[{i}]: {str(exc).split(chr(10), 1)[-1].strip()}")
        if errors:
            raise ValueError("\n".join(errors))
        return self

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


def _first_invalid(key: str, param: Param, contexts: list[dict[str, Any]], base_flat: dict[str, Any]) -> str:
    """The first ``(context, candidate)`` of a parameter that does not validate, as an error line ('' if none)."""
    for context in contexts:
        for candidate in param.candidates():
            try:
                TrialConfig.from_dict({**base_flat, **context, key: candidate})
            except ConfigError as exc:
                detail = str(exc).split("\n", 1)[-1].strip()
                where = "".join(f" when {k}={v}" for k, v in context.items())
                hint = "".join(f" (search it under when: {k}: for the values that take it)" for k in context)
                return f"params {key}: value {candidate!r} is invalid{where}: {detail}{hint}"
    return ""


def _get(flat_or_nested: dict[str, Any], key: str) -> Any:
    return flatten(unflatten(dict(flat_or_nested))).get(key)


def builtin_space_path(name: str) -> Path:
    return _SPACES_DIR / f"{name}.yaml"


def load_space(path_or_name: str | Path) -> SearchSpace:
    """Load and validate a space file (or a built-in space by name: smoke, pets, voc, camvid).

    Raises:
        ConfigError: missing file, bad YAML, or a schema error naming the key.
    """
    path = Path(path_or_name)
    if not path.is_file() and str(path_or_name) in BUILTIN_SPACES:
        path = builtin_space_path(str(path_or_name))
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path} (built-in spaces: {', '.join(BUILTIN_SPACES)})")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space {yaml_error(path, exc)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"search space {path} must be a mapping")
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid search space {path}:\n" + _space_errors(exc)) from None


def _space_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"] if p not in ("int_range", "float_range"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}" if key else "  " + msg.replace("\n", "\n  "))
    return "\n".join(lines)
