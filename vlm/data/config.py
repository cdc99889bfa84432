"""The data-side sections of the run config that the training loader reads: the random
resized crop of training images, the two views of image–image objectives and the
caption-consistent greyscale augmentation (pydantic only, no torch)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(Strict):
    """Two-view augmentation for image–image objectives (applied by vlm.data.augment)."""
    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = Field(0.5, ge=0, le=1)
    brightness: float = Field(0.2, ge=0)
    contrast: float = Field(0.2, ge=0, lt=1)


class CropConfig(Strict):
    """The training images' random resized crop (vlm.data.pixels.train_crop): a share
    `scale` of the image's area with aspect ratio (w / h) in `ratio`, resized to the model's
    image_size. OpenCLIP's default; scale [1, 1] with ratio [1, 1] is the evaluation's
    centre crop."""
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    @model_validator(mode="after")
    def _check(self) -> "CropConfig":
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale {list(self.scale)} must satisfy 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio {list(self.ratio)} must satisfy 0 < low <= high")
        return self


# Colour words the caption-consistent greyscale augmentation renames: the basic English
# colour terms and common shades. Achromatic words (black, white, grey) are left alone:
# they stay true of a greyscale image.
COLOUR_WORDS: tuple[str, ...] = (
    "red", "crimson", "scarlet", "maroon", "ruby", "cherry",
    "orange", "tangerine", "amber", "coral", "rust",
    "yellow", "golden", "gold", "lemon", "mustard",
    "green", "emerald", "grassy", "olive", "mint", "lime",
    "teal", "turquoise", "cyan", "aqua",
    "blue", "azure", "cobalt", "navy", "sapphire", "indigo",
    "purple", "violet", "plum", "lavender", "lilac", "magenta",
    "pink", "rose", "fuchsia", "brown", "beige", "tan",
)


class ColourAugmentConfig(Strict):
    """Caption-consistent greyscale augmentation (training only, applied by vlm.data.augment): a
    share of the samples is shown in greyscale, with every colour word of its caption,
    class label and region phrases renamed `grey_word`. A grey image of every shape makes
    the model read shape apart from colour, which is what lets a captioner name a colour
    and a shape it never saw together (docs/generative.md). No image of a new colour is
    made: on the demo, no held-out (colour, shape) pair is ever shown."""
    greyscale: float = Field(0.0, ge=0, le=1, description="share of samples shown in greyscale")
    grey_word: str = Field("grey", pattern=r"^[a-z]+$")
    colour_words: list[str] = Field(default_factory=lambda: list(COLOUR_WORDS))

    @model_validator(mode="after")
    def _check(self) -> "ColourAugmentConfig":
        for word in self.colour_words:
            if not word.isalpha() or word != word.lower():
                raise ValueError(f"colour_words: {word!r} is not a lower-case word")
        if self.grey_word in self.colour_words:
            raise ValueError(f"grey_word {self.grey_word!r} is one of colour_words: a grey image "
                             "would be named by a colour")
        return self

    @property
    def enabled(self) -> bool:
        return self.greyscale > 0
