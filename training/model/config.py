"""Model configuration: architectures are data (small JSON files in `configs/`), validated by pydantic.

A `ModelConfig` names the towers (a timm image model, a transformers text model), the widths of the
shared embedding space and of the joint transformer, the loss weights and the modality dropout. Widths
that depend on the data (the tabular input width, the tokenizer's vocabulary and special ids) are filled
in by `create_model` so that the config stored with a checkpoint rebuilds exactly the same model.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from index.preprocess import ImageSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StemConfig(_Strict):
    """A convolutional stem in front of the vision transformer (timm's `HybridEmbed`): a timm CNN cut at
    one of its feature stages, whose feature map the transformer's patch projection (`timm_kwargs`
    `patch_size`, in feature-map cells) turns into tokens.

    Early convolutions see small lesions (microaneurysms are 2-4 px at 224 px) that a 16 px linear patch
    projection trained from scratch learns slowly; a CPU-friendly CNN (e.g. `lcnet_050`) keeps the input at
    224 px for about the cost of a plain ViT at 112 px.
    """

    model_name: str = "lcnet_050"
    out_index: int = Field(default=3, ge=0)
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)


class VisionConfig(_Strict):
    """The image tower: a timm model, how a photograph becomes its input, and where its weights come from.

    `image` is the preprocessing spec (`index.preprocess.ImageSpec`: size, mean/std, field-of-view crop,
    illumination normalisation); the bundle carries the same spec so that serving prepares photographs as
    training did. Configs written before it was nested (`image_size`, `mean`, `std`, `illumination` beside
    `model_name`) still load. `pretrained_file` (a local .safetensors/.pth/.bin in timm's format) wins over
    the hub; with `pretrained` false the tower starts from random init. `timm_kwargs` are passed to
    `timm.create_model` (e.g. `depth`, `embed_dim`, `num_heads`, `patch_size`, `drop_path_rate`).
    `stem` (optional) puts a small timm CNN in front of the transformer in place of its linear patch
    embedding (a hybrid ViT); the stem always starts from random init.
    """

    model_name: str = "vit_base_patch16_224"
    image: ImageSpec = ImageSpec(size=224)
    pretrained: bool = True
    pretrained_file: str | None = None
    timm_kwargs: dict[str, Any] = Field(default_factory=dict)
    stem: StemConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_image_fields(cls, data: Any) -> Any:
        """Read the flat form (`image_size`, `mean`, `std`, `illumination`) into `image`."""
        if not isinstance(data, dict) or not any(key in data for key in _FLAT_IMAGE_FIELDS):
            return data
        data = dict(data)
        image = data.get("image", {})
        image = dict(image.model_dump() if isinstance(image, ImageSpec) else image)
        for flat, nested in _FLAT_IMAGE_FIELDS.items():
            if flat in data:
                image[nested] = data.pop(flat)
        data["image"] = image
        return data


_FLAT_IMAGE_FIELDS = {"image_size": "size", "mean": "mean", "std": "std", "illumination": "illumination"}


class TextConfig(_Strict):
    """The text tower: a transformers model (hub id or local folder) or a BERT built from `bert_config`.

    `tokenizer` is `"train"` (a WordPiece trained on the archive's narratives, see `training.tokenizer`),
    or a hub id / folder (None: the same as `hf_model_name`). `bert_config` is the architecture used when
    the tower is built from scratch: always for a trained tokenizer, and as the stated fallback when
    pretrained weights cannot be reached. `vocab_size` and the special token ids are those of the
    tokenizer; `create_model` overwrites them from the tokenizer it is given.
    """

    hf_model_name: str | None = None
    pretrained: bool = False
    tokenizer: str | None = None
    bert_config: dict[str, Any] | None = None
    max_length: int = Field(default=128, gt=2)
    vocab_size: int = Field(default=4096, gt=5)
    pad_token_id: int = 0
    mask_token_id: int = 4
    special_token_ids: tuple[int, ...] = (0, 1, 2, 3, 4)

    @model_validator(mode="after")
    def _check(self) -> TextConfig:
        if self.pretrained and not self.hf_model_name:
            raise ValueError("text.pretrained needs text.hf_model_name (a hub id or a local folder)")
        if self.tokenizer == "train" and self.pretrained:
            raise ValueError("a trained tokenizer ('train') needs a text tower built from scratch")
        if self.bert_config is None and not self.hf_model_name:
            raise ValueError("text needs hf_model_name or bert_config")
        if self.tokenizer is None and not self.hf_model_name:
            raise ValueError("text.tokenizer is needed when there is no hf_model_name")
        return self

    @property
    def tokenizer_source(self) -> str:
        """`"train"`, or the hub id / folder to load the tokenizer from."""
        return self.tokenizer or str(self.hf_model_name)


class TabularConfig(_Strict):
    """The MLP over the tabular features; `input_width` is `FeatureSpec.width` and `numeric_columns` its
    `numeric_value_columns` (both set by `create_model`).

    `numeric_encoding` says how the MLP sees a numeric value (age, diabetes duration): "linear" feeds the
    standardised number as it is; "periodic" first expands it into `frequencies` sines and cosines of
    learned frequencies (initialised from N(0, `frequency_scale`) per standardised unit), then a linear
    layer and ReLU (the PLR embedding of Gorishniy et al. 2022, "On Embeddings for Numerical Features in
    Tabular Deep Learning"). A plain MLP maps neighbouring ages to neighbouring vectors, so "63 years old"
    barely tells 63 from 64; the periodic embedding lets the tower tell exact values apart, which
    text -> record retrieval needs.
    """

    input_width: int | None = Field(default=None, gt=0)
    hidden: int = Field(default=128, gt=0)
    layers: int = Field(default=2, ge=1)
    dropout: float = Field(default=0.1, ge=0, lt=1)
    numeric_encoding: Literal["linear", "periodic"] = "linear"
    numeric_columns: tuple[int, ...] | None = None
    frequencies: int = Field(default=16, ge=1)
    frequency_scale: float = Field(default=3.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> TabularConfig:
        columns = self.numeric_columns or ()
        if self.input_width is not None and any(not 0 <= c < self.input_width for c in columns):
            raise ValueError(f"tabular.numeric_columns {list(columns)} fall outside input_width {self.input_width}")
        if len(set(columns)) != len(columns):
            raise ValueError(f"tabular.numeric_columns {list(columns)} repeat a column")
        return self


class FusionConfig(_Strict):
    """The joint transformer over [fused CLS] + image + text + tabular tokens."""

    width: int = Field(default=256, gt=0)
    depth: int = Field(default=2, ge=1)
    heads: int = Field(default=4, ge=1)
    mlp_ratio: float = Field(default=4.0, gt=0)
    dropout: float = Field(default=0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> FusionConfig:
        if self.width % self.heads:
            raise ValueError(f"fusion.width {self.width} is not divisible by fusion.heads {self.heads}")
        return self


class ImageDecoderConfig(_Strict):
    """The light MAE decoder that predicts the pixels of masked patches."""

    width: int = Field(default=128, gt=0)
    depth: int = Field(default=1, ge=1)
    heads: int = Field(default=4, ge=1)
    norm_pixels: bool = True


class LossConfig(_Strict):
    """Loss weights (0 switches a loss off and skips its computation), mask ratios and temperature.

    `contrastive_text_record` aligns the text embedding with the record embedding (image + tabular
    through the joint transformer), so that text -> record retrieval works. `class_weighting` sets the
    ICDR/SDRG class weights from the training split's counts (`losses.class_weights`).
    `icdr_image_only` / `sdrg_image_only` add the same grading losses on the joint transformer run over
    the photograph's tokens alone, every step: what `/grade` sees for a photograph, and the only grading
    signal the narrative (which states the grade) cannot shortcut. `image_grade_contrastive` pulls image
    embeddings of the same ICDR grade together (supervised contrastive, `losses.supervised_contrastive_loss`),
    so that searching by a photograph finds the same disease, not just a look-alike.
    `text_image_grade_contrastive` / `text_record_grade_contrastive` pull a text's embedding (its facts
    embedding for records) towards every photograph / record of the ICDR grade it describes, in the text ->
    gallery direction (`losses.cross_modal_supervised_contrastive_loss`, the pair's own temperature): the
    instance InfoNCE alone ranks a record that shares the text's other facts but not its grade above the
    records of that grade. `text_grade_min_icdr` leaves the texts of lower grades out of both terms (as
    queries; their photographs and records stay in every text's gallery): with 1, texts that state no DR, the
    large majority, keep finding their own case by the other facts they state, and only texts of a DR grade
    are pulled towards that grade.
    `counterfactual_records` adds, to each text's text -> record InfoNCE row, a hard negative: its own
    record with one fact the text states made false in the structured data (`training.text.counterfactual`).
    `grade_counterfactual_records` adds another: its own structured data fused with the photograph of a record
    of another ICDR grade from the batch, a record that differs from the text's in the grade alone.
    `image_uniformity` spreads the image embeddings over the sphere (`losses.uniformity_loss`): without it the
    photographs of one grade collapse to one point, and image -> image similarities read 0.999 for every
    neighbour. `image_appearance_uniformity` spreads only the appearance part of the image embedding
    (`ModelConfig.image_appearance_dims`), where the image-grade contrastive term does not reach.
    """

    contrastive_image_text: float = Field(default=1.0, ge=0)
    contrastive_image_tabular: float = Field(default=0.25, ge=0)
    contrastive_text_tabular: float = Field(default=0.25, ge=0)
    contrastive_text_record: float = Field(default=1.0, ge=0)
    image_reconstruction: float = Field(default=0.5, ge=0)
    text_mlm: float = Field(default=0.5, ge=0)
    icdr: float = Field(default=1.0, ge=0)
    sdrg: float = Field(default=1.0, ge=0)
    icdr_image_only: float = Field(default=0.0, ge=0)
    sdrg_image_only: float = Field(default=0.0, ge=0)
    image_grade_contrastive: float = Field(default=0.0, ge=0)
    text_image_grade_contrastive: float = Field(default=0.0, ge=0)
    text_record_grade_contrastive: float = Field(default=0.0, ge=0)
    text_grade_min_icdr: int = Field(default=0, ge=0)
    counterfactual_records: bool = False
    grade_counterfactual_records: bool = False
    image_uniformity: float = Field(default=0.0, ge=0)
    image_appearance_uniformity: float = Field(default=0.0, ge=0)
    image_mask_ratio: float = Field(default=0.75, gt=0, lt=1)
    text_mask_prob: float = Field(default=0.15, gt=0, lt=1)
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100)
    class_weighting: Literal["inverse_sqrt", "inverse", "none"] = "inverse_sqrt"

    @property
    def needs_fusion(self) -> bool:
        """Whether training uses the joint transformer at all (the CLIP baseline does not)."""
        return self.contrastive_text_record > 0 or self.grades_with_heads

    @property
    def grades_with_heads(self) -> bool:
        """Whether any grading loss trains the ICDR/SDRG heads."""
        return self.icdr > 0 or self.sdrg > 0 or self.icdr_image_only > 0 or self.sdrg_image_only > 0


class ModalityDropoutConfig(_Strict):
    """Per-sample probability of hiding each modality from the joint transformer while training.

    At least one present modality is always kept. Text is hidden most often: the narratives state the
    grade, so a grader that always sees the text would learn to read it and never look at the image.
    """

    image: float = Field(default=0.2, ge=0, lt=1)
    text: float = Field(default=0.6, ge=0, lt=1)
    tabular: float = Field(default=0.3, ge=0, lt=1)


class ModelConfig(_Strict):
    """A whole model: towers, shared embedding width, joint transformer, losses, modality dropout.

    `grading` says where grades come from at evaluation: `"heads"` (the ICDR/SDRG heads on the fused
    CLS) or `"zero_shot"` (CLIP-style: the image embedding against the text embeddings of the grade
    names), which is what the image-text-only baseline, whose heads are never trained, must use.

    `record_text_head` gives the text a projection of its own for the facts side (the text -> record and
    text -> tabular losses, and record search), beside the one that meets photographs: with a single shared
    text embedding, training drops the facts a photograph cannot show (sex, age, camera), since for the image
    loss they are only noise. Off (the default) keeps one text embedding for both, as older checkpoints have.
    `record_text_pooling` says what that head projects: the [CLS] state, or the mean of every token's state
    (padding left out), which keeps each stated word in reach of a shallow text tower trained from scratch.

    `image_appearance_dims` (k > 0) splits the image embedding in two: its first embed_dim - k dimensions
    come from `image_proj` (what the grade and the text say: the image-grade contrastive term pulls them
    together within a grade), its last k from `image_appearance_proj` (what the photograph looks like:
    `losses.image_appearance_uniformity` spreads them). Each part is L2-normalised and the appearance part
    carries `image_appearance_share` of the embedding's norm, so the whole stays a unit vector and two
    photographs of one grade with identical grade parts still read between 1 - 2 * share^2 and 1, by how
    alike they look. 0 (the default) keeps one projection, as older checkpoints have.
    `image_appearance_input` says what the appearance projection reads: the pooled feature (`"pooled"`, what
    `image_proj` reads too) or the pooled feature beside the mean of the patch tokens (`"pooled_and_patches"`),
    which keep more of what a photograph looks like than a pooled feature trained to find the grade.
    `image_appearance_detach` stops the appearance loss at the projection: the image tower, and so the
    grading that reads its tokens, learns nothing from it. `image_appearance_hidden` (> 0) makes the
    projection a two-layer MLP with that hidden width (GELU), which can draw more out of a tower trained
    for the grade than a linear map. `image_grade_hidden` (> 0) does the same for the grade part's
    projection (`image_proj`), so that the image-grade contrastive term can separate grades that a linear
    map of the pooled feature keeps close.

    `grade_part_weight` (w in [0, 1)) adds a grade part to the search embeddings (the `encode_*` entry
    points and the exported bundle, never the training losses): the square root of the ICDR probabilities
    the joint transformer reads from the photograph alone or from the text alone, carrying w of each unit
    embedding's norm, so a search scores (1 - w^2) x the learnt cosine + w^2 x the Bhattacharyya coefficient of
    the two grade distributions. Records and texts against records get zeros there. The embeddings are then
    embed_dim + num_icdr wide. 0 (the default) leaves them as older checkpoints have them.
    """

    name: str
    embed_dim: int = Field(default=256, gt=0)
    vision: VisionConfig = Field(default_factory=VisionConfig)
    text: TextConfig
    tabular: TabularConfig = Field(default_factory=TabularConfig)
    fusion: FusionConfig = Field(default_factory=FusionConfig)
    image_decoder: ImageDecoderConfig = Field(default_factory=ImageDecoderConfig)
    losses: LossConfig = Field(default_factory=LossConfig)
    modality_dropout: ModalityDropoutConfig = Field(default_factory=ModalityDropoutConfig)
    grading: Literal["heads", "zero_shot"] = "heads"
    record_text_head: bool = False
    record_text_pooling: Literal["cls", "mean"] = "cls"
    image_appearance_dims: int = Field(default=0, ge=0)
    image_appearance_share: float = Field(default=0.5, gt=0, lt=1)
    image_appearance_input: Literal["pooled", "pooled_and_patches"] = "pooled"
    image_appearance_detach: bool = False
    image_appearance_hidden: int = Field(default=0, ge=0)
    image_grade_hidden: int = Field(default=0, ge=0)
    grade_part_weight: float = Field(default=0.0, ge=0, lt=1)
    num_icdr: int = 5
    num_sdrg: int = 5

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.grading == "heads" and not self.losses.grades_with_heads:
            raise ValueError("grading 'heads' needs a positive icdr or sdrg loss weight; use 'zero_shot'")
        if self.image_appearance_dims >= self.embed_dim:
            raise ValueError(f"image_appearance_dims {self.image_appearance_dims} leaves no grade part of the "
                             f"{self.embed_dim}-dimensional image embedding; use fewer than embed_dim")
        if self.grade_part_weight > 0 and self.grading != "heads":
            raise ValueError("grade_part_weight needs grading 'heads': the grade part is the ICDR head's reading")
        if self.losses.image_appearance_uniformity > 0 and self.image_appearance_dims == 0:
            raise ValueError("losses.image_appearance_uniformity needs image_appearance_dims > 0")
        return self
