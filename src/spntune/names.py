"""The names the registries are keyed by, known without importing torch, smp or Ray.

Configs and search spaces are checked against these before anything heavy is imported, so a typo is
refused at once. Each registry holds the implementations under exactly these names
(``models.coarse.COARSE``, ``data.DATASETS``, ``losses.LOSSES``; the refiners' names are
``config.REFINER_CONFIGS``); ``tests/test_models.py`` checks that they agree.
"""

from __future__ import annotations

import difflib
import math
from functools import cache

__all__ = [
    "ARCHITECTURES",
    "ARCHITECTURE_KWARGS",
    "DATASET_NAMES",
    "ENCODERS",
    "LOSS_NAMES",
    "MODEL_KWARGS_TAKEN",
    "check_encoder",
    "check_model_kwargs",
    "dropped_model_kwargs",
    "parse_loss_spec",
]

#: Coarse networks: every segmentation_models.pytorch architecture, plus our FCN.
ARCHITECTURES = (
    "deeplabv3", "deeplabv3plus", "dpt", "fcn", "fpn", "linknet", "manet", "pan", "pspnet", "segformer", "unet",
    "unetplusplus", "upernet",
)  # fmt: skip

DATASET_NAMES = ("folder", "pets", "synthetic", "voc")

#: The encoder names segmentation_models.pytorch 0.6 registers (``smp.encoders.get_encoder_names()``),
#: held here so that a typo in ``model.encoder`` or ``refiner.affinity_encoder`` is refused at once:
#: importing smp to ask it takes seconds (torch). tests/test_config_input.py checks that they agree
#: with the installed smp. Every coarse network (our FCN too) and the U-Net affinity network build their
#: encoder through smp's ``get_encoder``, so these, and ``tu-<timm model>``, are all the names there are.
ENCODERS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x4d",
    "resnext101_32x8d", "resnext101_32x16d", "resnext101_32x32d", "resnext101_32x48d", "dpn68", "dpn68b", "dpn92",
    "dpn98", "dpn107", "dpn131", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "senet154", "se_resnet50", "se_resnet101", "se_resnet152", "se_resnext50_32x4d", "se_resnext101_32x4d",
    "densenet121", "densenet169", "densenet201", "densenet161", "inceptionresnetv2", "inceptionv4",
    "efficientnet-b0", "efficientnet-b1", "efficientnet-b2", "efficientnet-b3", "efficientnet-b4",
    "efficientnet-b5", "efficientnet-b6", "efficientnet-b7", "mobilenet_v2", "xception", "timm-efficientnet-b0",
    "timm-efficientnet-b1", "timm-efficientnet-b2", "timm-efficientnet-b3", "timm-efficientnet-b4",
    "timm-efficientnet-b5", "timm-efficientnet-b6", "timm-efficientnet-b7", "timm-efficientnet-b8",
    "timm-efficientnet-l2", "timm-tf_efficientnet_lite0", "timm-tf_efficientnet_lite1",
    "timm-tf_efficientnet_lite2", "timm-tf_efficientnet_lite3", "timm-tf_efficientnet_lite4", "timm-skresnet18",
    "timm-skresnet34", "timm-skresnext50_32x4d", "mit_b0", "mit_b1", "mit_b2", "mit_b3", "mit_b4", "mit_b5",
    "mobileone_s0", "mobileone_s1", "mobileone_s2", "mobileone_s3", "mobileone_s4",
)  # fmt: skip


@cache
def _timm_has_model(name: str) -> bool:
    import timm  # torch: only a ``tu-`` encoder pays for it, and its trial imports it anyway

    return bool(timm.is_model(name))


#: Older ``timm-`` names smp 0.6 still builds, as the timm encoders it renames them to (its
#: ``is_equivalent_to_timm_universal``): ``timm-regnetx_002`` is ``tu-regnetx_002``, and a mobilenetv3
#: ``tu-tf_mobilenetv3_...``.
TIMM_RENAMED_PREFIXES = ("timm-regnet", "timm-res2", "timm-resnest", "timm-mobilenetv3", "timm-gernet")


def _timm_model(name: str) -> str | None:
    """The timm model an encoder name stands for (``tu-<model>``, a renamed ``timm-`` name), else None."""
    if name.startswith(TIMM_RENAMED_PREFIXES):
        model = name.removeprefix("timm-")
        return f"tf_{model}" if "mobilenetv3" in model else model
    return name[3:] if name.startswith("tu-") and len(name) > 3 else None


def check_encoder(name: str) -> str:
    """``name`` if smp can build an encoder of that name, else ``ValueError`` listing the valid names.

    smp's own names are checked against ``ENCODERS`` (no import); ``tu-<model>`` against timm's registry,
    which imports torch (seconds), so only a config that names a timm encoder waits for it.
    """
    if name in ENCODERS:
        return name
    model = _timm_model(name)
    if model is not None:
        if model.startswith("hf-hub:"):  # timm fetches it from the Hugging Face hub when the trial builds it
            return name
        try:
            known = _timm_has_model(model)
        except ImportError:
            raise ValueError(f"encoder {name!r} is a timm model, and timm is not installed") from None
        if known:
            return name
        raise ValueError(f"unknown encoder {name!r}: timm has no model {model!r} (see timm.list_models())")
    close = difflib.get_close_matches(name, ENCODERS, n=3)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    raise ValueError(f"unknown encoder {name!r}{hint}; valid: {', '.join(ENCODERS)}, or 'tu-<timm model>'")


#: The keywords ``model.kwargs`` may set, by architecture: its constructor's own parameters in
#: segmentation_models.pytorch 0.6 (our FCN's for ``fcn``) and the deprecated ones smp still takes from its
#: ``**kwargs`` (``decoder_use_batchnorm``...), less ``MODEL_KWARGS_TAKEN``. smp hands any other keyword to
#: the encoder, and only a timm encoder (``tu-...``) takes one: smp's own encoders drop it without a word,
#: so a typo (``decoder_channel``) would train the default. One exception: ``get_encoder`` takes
#: ``output_stride`` (dilated last stages), which the decoders of unet, pspnet, upernet and segformer follow;
#: fpn, linknet, manet and unetplusplus fail on it, and deeplabv3(plus) and pan set it themselves
#: (``encoder_output_stride``). tests/test_config_input.py checks this table against the installed smp.
ARCHITECTURE_KWARGS: dict[str, tuple[str, ...]] = {
    "deeplabv3": ("encoder_depth", "encoder_output_stride", "decoder_channels", "decoder_atrous_rates",
                  "decoder_aspp_separable", "decoder_aspp_dropout", "upsampling"),
    "deeplabv3plus": ("encoder_depth", "encoder_output_stride", "decoder_channels", "decoder_atrous_rates",
                      "decoder_aspp_separable", "decoder_aspp_dropout", "upsampling"),
    "dpt": ("encoder_depth", "encoder_output_indices", "decoder_readout", "decoder_intermediate_channels",
            "decoder_fusion_channels"),
    "fcn": ("variant", "head_channels"),
    "fpn": ("encoder_depth", "decoder_pyramid_channels", "decoder_segmentation_channels", "decoder_merge_policy",
            "decoder_dropout", "decoder_interpolation", "upsampling"),
    "linknet": ("encoder_depth", "decoder_use_norm", "decoder_use_batchnorm"),
    "manet": ("encoder_depth", "decoder_use_norm", "decoder_channels", "decoder_pab_channels",
              "decoder_interpolation", "decoder_use_batchnorm"),
    "pan": ("encoder_depth", "encoder_output_stride", "decoder_channels", "decoder_interpolation", "upsampling",
            "upscale_mode"),
    "pspnet": ("encoder_depth", "psp_out_channels", "decoder_use_norm", "psp_dropout", "upsampling",
               "psp_use_batchnorm", "output_stride"),
    "segformer": ("encoder_depth", "decoder_segmentation_channels", "upsampling", "output_stride"),
    "unet": ("encoder_depth", "decoder_use_norm", "decoder_channels", "decoder_attention_type",
             "decoder_interpolation", "decoder_use_batchnorm", "output_stride"),
    "unetplusplus": ("encoder_depth", "decoder_use_norm", "decoder_channels", "decoder_attention_type",
                     "decoder_interpolation", "decoder_use_batchnorm"),
    "upernet": ("encoder_depth", "decoder_channels", "decoder_use_norm", "upsampling", "output_stride"),
}  # fmt: skip

#: Constructor keywords of every architecture that ``model.kwargs`` may not set, and why.
MODEL_KWARGS_TAKEN = {
    "encoder_name": "model.encoder sets it",
    "encoder_weights": "model.encoder_weights sets it",
    "classes": "the dataset's classes set it",
    "in_channels": "the images are RGB: 3 channels",
    "activation": "the losses and metrics take the network's logits",
    "aux_params": "a trial trains masks only (no classification head)",
}


def check_model_kwargs(arch: str, encoder: str, kwargs: dict[str, object]) -> None:
    """``model.kwargs`` for ``arch`` with ``encoder``: every key one the architecture takes
    (``ARCHITECTURE_KWARGS``); with a timm encoder (``tu-...``) other keys go to timm, except for ``fcn``.

    Raises:
        ValueError: naming the key and what is expected.
    """
    takes = ARCHITECTURE_KWARGS.get(arch, ())
    to_timm = arch != "fcn" and _timm_model(encoder) is not None
    for key in kwargs:
        if key in MODEL_KWARGS_TAKEN:
            raise ValueError(f"model.kwargs.{key}: not settable here ({MODEL_KWARGS_TAKEN[key]})")
        if key == "output_stride" and "encoder_output_stride" in takes:
            raise ValueError(f"model.kwargs.output_stride: {arch} sets it from encoder_output_stride; set that")
        if key.startswith("_"):
            raise ValueError(f"model.kwargs.{key}: smp drops keywords that start with '_'")
        if key not in takes and not to_timm:
            close = difflib.get_close_matches(key, takes, n=2)
            hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
            where = (
                ""
                if arch == "fcn"
                else " (smp's own encoders drop other keywords unread; a tu-<timm> encoder takes them)"
            )
            raise ValueError(
                f"model.kwargs.{key}: {arch} takes no such keyword{hint}; it takes {', '.join(takes)}{where}"
            )


def dropped_model_kwargs(arch: str, encoder: str, kwargs: dict[str, object]) -> list[str]:
    """The keys of ``kwargs`` smp drops unread when it builds ``arch`` with ``encoder``: those
    ``check_model_kwargs`` refuses as no keyword of the architecture (now; a checkpoint saved before it did
    may hold one). The model built with them is the model built without them."""
    if arch == "fcn":  # our FCN raises on an unknown keyword: no model was built with one
        return []
    takes, to_timm = ARCHITECTURE_KWARGS.get(arch, ()), _timm_model(encoder) is not None
    known = (*takes, *MODEL_KWARGS_TAKEN, "output_stride")  # those that were used, or failed the build
    return [key for key in kwargs if key.startswith("_") or (key not in known and not to_timm)]


LOSS_NAMES = ("ce", "dice", "focal", "jaccard", "lovasz")


def parse_loss_spec(spec: str) -> list[tuple[float, str]]:
    """``"ce+0.5*dice"`` -> ``[(1.0, "ce"), (0.5, "dice")]``; unknown names list the valid ones."""
    terms = []
    for raw in spec.replace(" ", "").split("+"):
        weight_text, _, name = raw.rpartition("*")
        if name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {name!r} in {spec!r}; valid: {list(LOSS_NAMES)} joined by '+'")
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ValueError(f"bad weight {weight_text!r} in loss spec {spec!r}") from None
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"loss weights must be finite numbers > 0, got {weight_text} in {spec!r}")
        terms.append((weight, name))
    return terms
