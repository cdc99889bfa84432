"""The objectives' pydantic configs (torch-free), one per objective file.

They are kept free of torch so that vlm.config (and with it the CLI) can validate a run's
config without importing torch. Each objective module re-exports its own config (`from
vlm.objectives.itg import ITGConfig`)."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class _Objective(BaseModel):
    """What every objective's config has: a `name` (each subclass narrows it to its
    Literal, the union's discriminator) and the loss `weight`; unknown keys are errors."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    name: str
    weight: float = Field(1.0, gt=0)


# clip_infonce.py
class ClipInfoNCEConfig(_Objective):
    name: Literal["clip_infonce"] = "clip_infonce"
    # below 0.01 the clamp would pin 1/T at 100 with a zero gradient from the first step
    init_temperature: float = Field(0.07, ge=0.01)
    learn_temperature: bool = True


# siglip.py
class SigLIPConfig(_Objective):
    name: Literal["siglip"] = "siglip"
    # SigLIP initialises t = exp(t') with t' = log 10, i.e. a temperature of 1/10, and
    # b = -10 so that the many negatives do not dominate the first steps
    init_temperature: float = Field(0.1, gt=0)
    init_bias: float = -10.0
    learn_temperature: bool = True


# slip_image.py
class SlipImageConfig(_Objective):
    name: Literal["slip_image"] = "slip_image"
    head_hidden: int = Field(512, ge=1)
    head_dim: int = Field(128, ge=1)
    temperature: float = Field(0.1, gt=0)


# unicl.py
class UniCLConfig(_Objective):
    name: Literal["unicl"] = "unicl"
    init_temperature: float = Field(0.07, ge=0.01)  # see ClipInfoNCEConfig
    learn_temperature: bool = True


# mim.py
class MIMConfig(_Objective):
    name: Literal["mim"] = "mim"
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    norm_pix: bool = True
    decoder_width: int = Field(64, gt=0)
    decoder_depth: int = Field(1, gt=0)
    decoder_heads: int = Field(4, gt=0)


# mlm.py
class MLMConfig(_Objective):
    name: Literal["mlm"] = "mlm"
    mask_ratio: float = Field(0.15, gt=0, lt=1)


# mcm.py
class MCMConfig(_Objective):
    name: Literal["mcm"] = "mcm"
    image_mask_ratio: float = Field(0.4, gt=0, lt=1)
    text_mask_ratio: float = Field(0.15, gt=0, lt=1)


# itg.py
class ITGConfig(_Objective):
    name: Literal["itg"] = "itg"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # word dropout on the decoder's input (training only): this share of text positions is
    # replaced by a learned vector, so the next word must often be read from the image
    # rather than guessed from the words before it (Bowman et al. 2016 drop words for the
    # same reason). Against the shortcut "red -> the shape red was seen with".
    input_dropout: float = Field(0.0, ge=0, lt=1)


# itm.py
class ITMConfig(_Objective):
    name: Literal["itm"] = "itm"
    negative_temperature: float = Field(0.07, gt=0, description="of the softmax the negatives are drawn from")
    # Also exclude rows with the same class label (batch["labels"], as UniCL's positives):
    # for a corpus whose captions mostly name the class, another image's caption of the
    # same class usually describes this image too, and drawing it as a negative is label noise.
    exclude_same_label: bool = False


# region_word.py
class RegionWordConfig(_Objective):
    name: Literal["region_word"] = "region_word"
    output_size: int = Field(2, gt=0, description="RoI-align bins per side (averaged into one feature)")
    sampling_ratio: int = Field(2, gt=0, description="bilinear samples per bin per side")
    focal_alpha: float | None = Field(0.25, gt=0, lt=1)
    focal_gamma: float = Field(2.0, ge=0)
    init_scale: float = Field(10.0, gt=0)
    init_bias: float = -2.0


OBJECTIVE_CONFIGS = (ClipInfoNCEConfig, SigLIPConfig, SlipImageConfig, UniCLConfig,
                     MIMConfig, MLMConfig, MCMConfig, ITGConfig, ITMConfig, RegionWordConfig)
# one objective's config, told apart by `name`
AnyObjectiveConfig = Annotated[Union[OBJECTIVE_CONFIGS], Field(discriminator="name")]

__all__ = ["OBJECTIVE_CONFIGS", "AnyObjectiveConfig", "ClipInfoNCEConfig", "SigLIPConfig", "SlipImageConfig",
           "UniCLConfig", "MIMConfig", "MLMConfig", "MCMConfig", "ITGConfig", "ITMConfig", "RegionWordConfig"]
