"""`RetinaAlignModel`: three towers, a shared embedding space, a joint transformer and the training losses.

Inference entry points, each usable and exportable on its own (no numpy, no `no_grad`, no device
choice inside): `encode_image`, `encode_text`, `encode_tabular`, `encode_record` (L2-normalised
embeddings) and `fuse` (grade logits from any subset of modalities). `forward(batch)` is the training
step's loss computation.

How the embeddings are trained (`forward`), each term weighted by `config.losses` and skipped at 0:

- InfoNCE between the projected image, text and tabular embeddings, pair by pair, each pair with its
  own learned temperature (`logit_scales`, stored as a log, clamped to [0, max] like CLIP).
- The record embedding is the joint transformer's fused CLS over image + tabular (no text), projected
  by `record_proj`. It is trained by InfoNCE against the text embedding (`contrastive_text_record`),
  so a clinician's text finds records (photograph + structured data) in the same space that
  `encode_text` maps into; text never enters the record, so the match cannot be a copy.
- MAE: a second, cheap image pass over the kept quarter of the patches feeds a light decoder that
  predicts the per-patch-normalised pixels of the masked patches. MLM: a second text pass over
  BERT-masked tokens, decoded with the word-embedding matrix (weights tied by use, not by aliasing, so
  the state dict stays plain for safetensors).
- ICDR and SDRG cross-entropy (class-weighted, missing grades = -100 ignored) on the fused CLS of a
  joint pass where, while training, each sample hides each modality with the configured probability,
  so that every subset (image alone, text alone, image + tabular, all) is trained.
- With `image_appearance_dims`, the image embedding has a grade part (`image_proj`, the one the
  image-grade contrastive term pulls together within a grade) and an appearance part
  (`image_appearance_proj`, spread by `image_appearance_uniformity`), joined into one unit vector.

- With `grade_part_weight` w > 0, the inference entry points (not `forward`) end each search embedding in a
  grade part (`with_grade_part`): the square root of the ICDR probabilities the joint transformer reads
  from the photograph alone (`encode_image*`) or the text alone (`encode_text*` against photographs), a
  unit vector carrying w of the norm. The cosine of two such parts is the Bhattacharyya coefficient of the
  two grade distributions, so photographs and texts whose grades the model reads alike rank first, then by
  the learnt embedding. Record embeddings and texts against records end in zeros instead (scores unchanged).

The CLIP baseline (`clip-baseline`) sets every weight but `contrastive_image_text` to 0: only the
towers and their projections are trained, the fusion, heads and record projection stay at random init
(built anyway so that the same export and evaluation code runs), and its grades come from zero-shot
prompts (`config.grading == "zero_shot"`, `zero_shot_logits`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.model.config import ImageDecoderConfig, ModelConfig
from training.model.fusion import FusionOutput, FusionTransformer, ModalityTokens
from training.model.losses import (
    IGNORE_INDEX,
    contrastive_loss,
    contrastive_loss_with_hard_negatives,
    cross_modal_supervised_contrastive_loss,
    mask_tokens,
    maskable_tokens,
    masked_patch_loss,
    normalize_patches,
    other_label_partners,
    patchify,
    random_patch_mask,
    supervised_contrastive_loss,
    uniformity_loss,
    weighted_cross_entropy,
)
from training.model.tabular import TabularEncoder
from training.model.towers import ImageTower, TextTower

CONTRASTIVE_PAIRS: tuple[tuple[str, str], ...] = (
    ("image", "text"),
    ("image", "tabular"),
    ("text", "tabular"),
    ("text", "record"),
)
"""Embedding pairs aligned by InfoNCE; the loss of (a, b) is `contrastive_{a}_{b}`."""
FACT_SIDES = ("record", "tabular")
"""The partners of the text whose pair uses the text's facts embedding (its record head, `record_text_head`)."""
IMAGE_GRADE_SCALE = "image_grade"
"""The logit scale of the supervised contrastive loss between image embeddings of one ICDR grade."""
TEXT_GRADE_SCALES = {"image": "image_text", "record": "text_record"}
"""The galleries of the text -> gallery grade terms (`text_<gallery>_grade_contrastive`) and the pair whose
learned temperature each shares."""


class MaskedImageDecoder(nn.Module):
    """MAE's light decoder: visible patch states + mask tokens + positions -> pixels of every patch."""

    def __init__(self, in_width: int, config: ImageDecoderConfig, num_patches: int, patch_dim: int) -> None:
        super().__init__()
        self.embed = nn.Linear(in_width, config.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, config.width))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=config.width,
            nhead=config.heads,
            dim_feedforward=4 * config.width,
            dropout=0.0,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.width)
        self.pred = nn.Linear(config.width, patch_dim)

    def forward(self, visible: Tensor, keep: Tensor) -> Tensor:
        """visible (B, K, in_width) states of the kept patches `keep` (B, K) -> (B, N, patch_dim)."""
        x = self.embed(visible)
        b, _, width = x.shape
        full = self.mask_token.to(x.dtype).expand(b, self.pos_embed.shape[1], width)
        full = full.scatter(1, keep.unsqueeze(-1).expand(-1, -1, width), x)
        return self.pred(self.norm(self.blocks(full + self.pos_embed.to(x.dtype))))


class MlmHead(nn.Module):
    """BERT's MLM transform (dense, GELU, LayerNorm), decoded with the tower's word embeddings."""

    def __init__(self, width: int, vocab_size: int) -> None:
        super().__init__()
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def forward(self, states: Tensor, word_embeddings: Tensor) -> Tensor:
        """(..., width) token states -> (..., vocab) logits."""
        return F.linear(self.transform(states), word_embeddings, self.bias)


def _projection(width: int, dims: int, hidden: int) -> nn.Module:
    """An image embedding part's projection: linear, or with `hidden` > 0 a two-layer GELU MLP."""
    if hidden == 0:
        return nn.Linear(width, dims, bias=False)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, dims, bias=False))


class RetinaAlignModel(nn.Module):
    """Image, text and tabular towers aligned in one space, with a joint transformer for grading."""

    def __init__(self, config: ModelConfig, pretrained: bool | None = None) -> None:
        """Build from a resolved config (`tabular.input_width` set); `pretrained` overrides both towers'."""
        super().__init__()
        if config.tabular.input_width is None:
            raise ValueError("config.tabular.input_width is unset: pass tabular_width to create_model")
        self.image = ImageTower(config.vision, pretrained)
        self.text = TextTower(config.text, pretrained)
        if self.text.vocab_size != config.text.vocab_size:  # pretrained weights decide the vocabulary
            text = config.text.model_copy(update={"vocab_size": self.text.vocab_size})
            config = config.model_copy(update={"text": text})
        self.config = config
        self.tabular = TabularEncoder(config.tabular.input_width, config.tabular)

        dim, width = config.embed_dim, config.fusion.width
        appearance = config.image_appearance_dims
        self.image_proj = _projection(self.image.width, dim - appearance, config.image_grade_hidden)
        # the appearance part of the image embedding (`ModelConfig.image_appearance_dims`), when it has one
        appearance_width = self.image.width * (2 if config.image_appearance_input == "pooled_and_patches" else 1)
        self.image_appearance_proj = (
            _projection(appearance_width, appearance, config.image_appearance_hidden) if appearance else None
        )
        self.text_proj = nn.Linear(self.text.width, dim, bias=False)
        self.tabular_proj = nn.Linear(self.tabular.width, dim, bias=False)
        self.record_proj = nn.Linear(width, dim, bias=False)
        # the text's facts side (text -> record / tabular), when it has a projection of its own
        self.text_record_proj = nn.Linear(self.text.width, dim, bias=False) if config.record_text_head else None
        self.image_to_fusion = nn.Linear(self.image.width, width)
        self.text_to_fusion = nn.Linear(self.text.width, width)
        self.tabular_to_fusion = nn.Linear(self.tabular.width, width)
        self.fusion = FusionTransformer(config.fusion, config.num_icdr, config.num_sdrg)

        losses = config.losses
        self.image_decoder = (
            MaskedImageDecoder(
                self.image.width, config.image_decoder, self.image.num_patches, self.image.patch_size**2 * 3
            )
            if losses.image_reconstruction > 0
            else None
        )
        self.mlm_head = MlmHead(self.text.width, self.text.vocab_size) if losses.text_mlm > 0 else None
        scales = [f"{a}_{b}" for a, b in CONTRASTIVE_PAIRS]
        if losses.image_grade_contrastive > 0:  # only then: older checkpoints keep loading strictly
            scales.append(IMAGE_GRADE_SCALE)
        self.logit_scales = nn.ParameterDict(
            {name: nn.Parameter(torch.tensor(losses.init_logit_scale)) for name in scales}
        )
        self.register_buffer("icdr_class_weights", torch.ones(config.num_icdr))
        self.register_buffer("sdrg_class_weights", torch.ones(config.num_sdrg))
        self.register_buffer(
            "special_token_ids",
            torch.tensor(config.text.special_token_ids, dtype=torch.long),
            persistent=False,
        )
        self._freeze_untrained()

    # --- inference --------------------------------------------------------------------------------

    @property
    def search_dim(self) -> int:
        """The width of every search embedding (`encode_*`, `search_record_embedding`): embed_dim, plus the
        grade part's num_icdr with `grade_part_weight` > 0."""
        return self.config.embed_dim + (self.config.num_icdr if self.config.grade_part_weight > 0 else 0)

    def encode_image(self, pixels: Tensor) -> Tensor:
        """Normalised pixels (B, 3, H, W) -> L2-normalised image embeddings (B, search_dim)."""
        return self.encode_image_for_fusion(pixels)[0]

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids and mask (B, L) -> L2-normalised text embeddings against photographs (B, search_dim)."""
        return self.encode_text_for_fusion(input_ids, attention_mask)[0]

    def encode_text_for_records(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids and mask (B, L) -> L2-normalised text embeddings that search records (B, search_dim): the
        record head's where the model has one (`record_text_head`), else the same as `encode_text`."""
        if self.text_record_proj is None:
            return self.encode_text(input_ids, attention_mask)
        states = self.text(input_ids, attention_mask)
        return self.with_grade_part(self._embed_text_for_records(states, attention_mask))

    def encode_text_for_search(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One pass of the text tower -> (text embedding against photographs (B, D), against records (B, D),
        text tokens for the joint transformer (B, L, width)). The two embeddings are equal without a record
        head."""
        states = self.text(input_ids, attention_mask)
        tokens = self.text_to_fusion(states)
        image_side = self._text_with_grade_part(self._embed_text(states), tokens, attention_mask)
        if self.text_record_proj is None:
            return image_side, image_side, tokens
        return image_side, self.with_grade_part(self._embed_text_for_records(states, attention_mask)), tokens

    def encode_image_for_fusion(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """One pass of the image tower -> (L2-normalised image embedding (B, D), the image tokens the joint
        transformer reads (B, N, fusion width))."""
        states = self.image(pixels)
        tokens = self.image_to_fusion(states)
        embedding = self._embed_image(states)
        if self.config.grade_part_weight > 0:
            return self.with_grade_part(embedding, self.fusion({"image": self._tokens(tokens, None)})), tokens
        return embedding, tokens

    def encode_text_for_fusion(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """One pass of the text tower -> (L2-normalised text embedding (B, D), text tokens (B, L, width))."""
        states = self.text(input_ids, attention_mask)
        tokens = self.text_to_fusion(states)
        return self._text_with_grade_part(self._embed_text(states), tokens, attention_mask), tokens

    def with_grade_part(self, embedding: Tensor, fused: FusionOutput | None = None) -> Tensor:
        """A learnt embedding (B, embed_dim) as a search embedding (B, search_dim): unchanged with
        `grade_part_weight` 0; else followed by the grade part, the square root of `fused`'s ICDR
        probabilities weighted by `grade_part_weight` of the norm (the rest scaled to keep a unit vector), or
        by zeros where `fused` is None (records, texts against records: their scores stay as they were)."""
        weight = self.config.grade_part_weight
        if weight == 0:
            return embedding
        if fused is None:
            return torch.cat([embedding, embedding.new_zeros(embedding.shape[0], self.config.num_icdr)], dim=-1)
        part = fused.icdr_logits.float().softmax(dim=-1).sqrt().to(embedding.dtype)
        return torch.cat([embedding * math.sqrt(1 - weight**2), part * weight], dim=-1)

    def search_record_embedding(self, fused: FusionOutput) -> Tensor:
        """The record embedding of a fusion output as a search embedding (B, search_dim)."""
        return self.with_grade_part(self.embed_record(fused))

    def _text_with_grade_part(self, embedding: Tensor, tokens: Tensor, attention_mask: Tensor) -> Tensor:
        """A text embedding against photographs with the grade part the text alone gives (`with_grade_part`)."""
        if self.config.grade_part_weight == 0:
            return embedding
        fused = self.fusion({"text": self._tokens(tokens, None, ~attention_mask.bool())})
        return self.with_grade_part(embedding, fused)

    def encode_tabular(self, features: Tensor) -> Tensor:
        """`FeatureSpec.transform` features (B, F) -> L2-normalised tabular embeddings (B, embed_dim)."""
        return F.normalize(self.tabular_proj(self.tabular(features)), dim=-1)

    def encode_record(self, pixels: Tensor, tabular: Tensor | None = None) -> Tensor:
        """Photograph (+ structured data) through the joint transformer -> L2-normalised record embedding
        (B, search_dim)."""
        return self.search_record_embedding(self.fuse(pixels=pixels, tabular=tabular))

    def fuse(
        self,
        pixels: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        tabular: Tensor | None = None,
        image_present: Tensor | None = None,
        text_present: Tensor | None = None,
        tabular_present: Tensor | None = None,
    ) -> FusionOutput:
        """Grade logits and fused CLS from any subset of modalities.

        A modality passed as None is absent for every sample; a `*_present` (B,) bool tensor hides it
        for the samples marked False (one exported graph can then serve every subset).
        """
        if input_ids is not None and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self._fuse_states(
            image_states=self.image(pixels) if pixels is not None else None,
            text_states=self.text(input_ids, attention_mask) if input_ids is not None else None,
            attention_mask=attention_mask,
            tabular_hidden=self.tabular(tabular) if tabular is not None else None,
            present={"image": image_present, "text": text_present, "tabular": tabular_present},
        )

    def fuse_tokens(
        self,
        image_tokens: Tensor,
        text_tokens: Tensor,
        attention_mask: Tensor,
        tabular: Tensor,
        image_present: Tensor,
        text_present: Tensor,
        tabular_present: Tensor,
    ) -> FusionOutput:
        """The joint transformer over tokens the towers already made (`encode_*_for_fusion`): the same
        result as `fuse` on the raw inputs. Absent rows may hold any values (zeros): the presence flags
        hide them, and the text padding mask hides padding."""
        padding = ~attention_mask.bool()
        token = self.tabular_to_fusion(self.tabular(tabular)).unsqueeze(1)
        return self.fusion({
            "image": self._tokens(image_tokens, image_present),
            "text": self._tokens(text_tokens, text_present, padding),
            "tabular": self._tokens(token, tabular_present),
        })

    def zero_shot_logits(self, image_embeddings: Tensor, class_text_embeddings: Tensor) -> Tensor:
        """CLIP-style class logits: scaled cosine between images (B, D) and class prompts (C, D)."""
        return self.logit_scale("image_text") * image_embeddings @ class_text_embeddings.T

    def logit_scale(self, pair: str) -> Tensor:
        """The clamped multiplicative logit scale of a contrastive pair, e.g. "image_text"."""
        return self.logit_scales[pair].clamp(0, self.config.losses.max_logit_scale).exp()

    # --- training ---------------------------------------------------------------------------------

    def lock_image(self) -> None:
        """Freeze the image tower and its projections, grade and appearance parts (locked-image tuning, as in
        LiT: Zhai et al. 2022): the photographs' embeddings, and so an index built from them, stay exactly as they
        are, while the text, tabular and joint-transformer sides keep learning against them."""
        for module in (self.image, self.image_proj, self.image_appearance_proj):
            if module is not None:
                module.requires_grad_(False)
        if self.image_decoder is not None:
            self.image_decoder.requires_grad_(False)

    def set_class_weights(self, icdr: Tensor, sdrg: Tensor) -> None:
        """Set the ICDR and SDRG cross-entropy class weights (see `losses.class_weights`)."""
        self.icdr_class_weights.copy_(icdr)
        self.sdrg_class_weights.copy_(sdrg)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Every configured loss for a batch, unweighted, plus their weighted sum under "total".

        Batch keys (each optional, the losses that need a missing one are skipped): "pixels" (B, 3, H,
        W), or "image_states" (B, N, width), what the image tower made of them earlier (a locked tower,
        `lock_image`: the masked-patch reconstruction then has no pixels and is skipped); "input_ids" and
        "attention_mask" (B, L), "tabular" (B, F), "icdr" and "sdrg" (B,) long with -100 for a missing
        grade; "counterfactual_tabular" (B, F) and "counterfactual_present" (B,) bool, the text -> record
        hard negatives used under `losses.counterfactual_records` (`losses.grade_counterfactual_records` draws
        its own from the batch's photographs and "icdr").
        """
        weights = self.config.losses
        pixels, input_ids, tabular = batch.get("pixels"), batch.get("input_ids"), batch.get("tabular")
        attention_mask = batch.get("attention_mask")
        if input_ids is not None and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)

        image_states = batch.get("image_states")
        if image_states is None and pixels is not None:
            image_states = self.image(pixels)
        text_states = self.text(input_ids, attention_mask) if input_ids is not None else None
        tabular_hidden = self.tabular(tabular) if tabular is not None else None
        embeddings: dict[str, Tensor] = {}
        image_parts: tuple[Tensor, Tensor | None] | None = None
        if image_states is not None:
            image_parts = self._image_parts(image_states)
            embeddings["image"] = self._join_image_parts(*image_parts)
        if text_states is not None:
            embeddings["text"] = self._embed_text(text_states)
            # the facts side of the text: its own head's, or the one text embedding
            embeddings["text_facts"] = (
                self._embed_text_for_records(text_states, attention_mask) if self.text_record_proj is not None
                else embeddings["text"]
            )
        if tabular_hidden is not None:
            embeddings["tabular"] = F.normalize(self.tabular_proj(tabular_hidden), dim=-1)
        records_scored = weights.contrastive_text_record > 0 or weights.text_record_grade_contrastive > 0
        if records_scored and text_states is not None and image_states is not None:
            record = self._fuse_states(image_states, None, None, tabular_hidden, present={})
            embeddings["record"] = self.embed_record(record)

        losses: dict[str, Tensor] = {}
        hard_records = (
            self._record_hard_negatives(batch, image_states, tabular_hidden)
            if "record" in embeddings and weights.contrastive_text_record > 0 else None
        )
        for a, b in CONTRASTIVE_PAIRS:
            name = f"contrastive_{a}_{b}"
            if b == "record" and hard_records is not None:
                continue  # with its hard negatives below
            if getattr(weights, name) > 0 and a in embeddings and b in embeddings:
                query = embeddings["text_facts"] if a == "text" and b in FACT_SIDES else embeddings[a]
                losses[name] = contrastive_loss(query, embeddings[b], self.logit_scale(f"{a}_{b}"))
        if hard_records is not None:
            losses["contrastive_text_record"] = contrastive_loss_with_hard_negatives(
                embeddings["text_facts"], embeddings["record"], self.logit_scale("text_record"), *hard_records
            )
        if weights.image_grade_contrastive > 0 and image_parts is not None and "icdr" in batch:
            losses["image_grade_contrastive"] = supervised_contrastive_loss(  # the grade part only
                image_parts[0], batch["icdr"], self.logit_scale(IMAGE_GRADE_SCALE)
            )
        for gallery, pair in TEXT_GRADE_SCALES.items():
            name = f"text_{gallery}_grade_contrastive"
            if getattr(weights, name) > 0 and "text" in embeddings and gallery in embeddings and "icdr" in batch:
                query = embeddings["text_facts"] if gallery in FACT_SIDES else embeddings["text"]
                icdr = batch["icdr"]
                queried = icdr.masked_fill(icdr < weights.text_grade_min_icdr, IGNORE_INDEX)
                losses[name] = cross_modal_supervised_contrastive_loss(
                    query, embeddings[gallery], queried, self.logit_scale(pair), key_labels=icdr
                )
        if weights.image_uniformity > 0 and "image" in embeddings:
            losses["image_uniformity"] = uniformity_loss(embeddings["image"])
        if weights.image_appearance_uniformity > 0 and image_parts is not None and image_parts[1] is not None:
            losses["image_appearance_uniformity"] = uniformity_loss(image_parts[1])
        if self.image_decoder is not None and pixels is not None:
            losses["image_reconstruction"] = self._reconstruction_loss(pixels)
        if self.mlm_head is not None and input_ids is not None:
            losses["text_mlm"] = self._mlm_loss(input_ids, attention_mask)
        graded = [(n, batch[n]) for n in ("icdr", "sdrg") if getattr(weights, n) > 0 and n in batch]
        if graded:
            available = {"image": image_states, "text": text_states, "tabular": tabular_hidden}
            available = {k: v for k, v in available.items() if v is not None}
            present = self._modality_dropout(list(available), next(iter(available.values())))
            fused = self._fuse_states(image_states, text_states, attention_mask, tabular_hidden, present)
            losses |= self._grading_losses(fused, graded)
        image_only = [(n, batch[n]) for n in ("icdr", "sdrg") if getattr(weights, f"{n}_image_only") > 0 and n in batch]
        if image_only and image_states is not None:
            fused = self._fuse_states(image_states, None, None, None, present={})
            losses |= self._grading_losses(fused, image_only, suffix="_image_only")
        if not losses:
            keys = sorted(batch)
            raise ValueError(f"the batch (keys {keys}) gives no loss under config {self.config.name!r}")
        losses["total"] = torch.stack([getattr(weights, n) * loss for n, loss in losses.items()]).sum()
        return losses

    # --- internals --------------------------------------------------------------------------------

    def _record_hard_negatives(
        self, batch: Mapping[str, Tensor], image_states: Tensor, tabular_hidden: Tensor | None
    ) -> tuple[Tensor, Tensor] | None:
        """The text -> record hard negatives of each row, (B, K, D) record embeddings and (B, K) presence, or None
        when the config asks for none or the batch cannot give them: a counterfactual of the row's structured data
        (`counterfactual_records`) and the row's structured data with another grade's photograph
        (`grade_counterfactual_records`)."""
        weights = self.config.losses
        records: list[Tensor] = []
        present: list[Tensor] = []
        if weights.counterfactual_records and "counterfactual_tabular" in batch:
            fused = self._fuse_states(image_states, None, None, self.tabular(batch["counterfactual_tabular"]),
                                      present={})
            records.append(self.embed_record(fused))
            present.append(batch["counterfactual_present"])
        if weights.grade_counterfactual_records and "icdr" in batch and tabular_hidden is not None:
            partner, has_partner = other_label_partners(batch["icdr"])
            fused = self._fuse_states(image_states[partner], None, None, tabular_hidden, present={})
            records.append(self.embed_record(fused))
            present.append(has_partner)
        if not records:
            return None
        return torch.stack(records, dim=1), torch.stack(present, dim=1)

    def _grading_losses(
        self, fused: FusionOutput, targets: list[tuple[str, Tensor]], suffix: str = ""
    ) -> dict[str, Tensor]:
        """Class-weighted cross-entropy of the ICDR / SDRG heads, named `<grade><suffix>`."""
        losses: dict[str, Tensor] = {}
        for name, target in targets:
            logits = fused.icdr_logits if name == "icdr" else fused.sdrg_logits
            losses[f"{name}{suffix}"] = weighted_cross_entropy(logits, target, getattr(self, f"{name}_class_weights"))
        return losses

    def _freeze_untrained(self) -> None:
        """Stop gradients to parameters that no configured loss trains (the baseline's fusion, ...).

        They stay in the model (same export and evaluation code), but the optimizer and DDP skip them:
        DDP would otherwise wait for their gradients forever (or need `find_unused_parameters`).
        """
        losses = self.config.losses
        unused: list[nn.Module | nn.Parameter] = [
            self.logit_scales[f"{a}_{b}"] for a, b in CONTRASTIVE_PAIRS if getattr(losses, f"contrastive_{a}_{b}") == 0
        ]
        if not losses.needs_fusion:
            unused += [self.fusion, self.image_to_fusion, self.text_to_fusion, self.tabular_to_fusion]
        records_unused = losses.contrastive_text_record == 0 and losses.text_record_grade_contrastive == 0
        if records_unused:
            unused.append(self.record_proj)
        facts_unused = records_unused and losses.contrastive_text_tabular == 0
        if self.text_record_proj is not None and facts_unused:
            unused.append(self.text_record_proj)
        if losses.contrastive_image_tabular == 0 and losses.contrastive_text_tabular == 0:
            unused.append(self.tabular_proj)
            if not losses.needs_fusion:
                unused.append(self.tabular)
        for item in unused:
            item.requires_grad_(False)

    def _embed_image(self, states: Tensor) -> Tensor:
        return self._join_image_parts(*self._image_parts(states))

    def _image_parts(self, states: Tensor) -> tuple[Tensor, Tensor | None]:
        """(grade part, appearance part or None), each L2-normalised on its own."""
        pooled = self.image.pool(states)
        grade = F.normalize(self.image_proj(pooled), dim=-1)
        if self.image_appearance_proj is None:
            return grade, None
        features = pooled
        if self.config.image_appearance_input == "pooled_and_patches":
            features = torch.cat([pooled, states[:, self.image.num_prefix_tokens :].mean(dim=1)], dim=-1)
        if self.config.image_appearance_detach:
            features = features.detach()
        return grade, F.normalize(self.image_appearance_proj(features), dim=-1)

    def _join_image_parts(self, grade: Tensor, appearance: Tensor | None) -> Tensor:
        """The unit image embedding: the grade part alone, or both parts weighted by their share of the norm."""
        if appearance is None:
            return grade
        share = self.config.image_appearance_share
        return torch.cat([grade * math.sqrt(1 - share**2), appearance * share], dim=-1)

    def _embed_text(self, states: Tensor) -> Tensor:
        return F.normalize(self.text_proj(states[:, 0]), dim=-1)

    def _embed_text_for_records(self, states: Tensor, attention_mask: Tensor) -> Tensor:
        if self.text_record_proj is None:
            return self._embed_text(states)
        if self.config.record_text_pooling == "mean":  # every token's state, padding left out
            weights = attention_mask.to(states.dtype).unsqueeze(-1)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
        else:
            pooled = states[:, 0]
        return F.normalize(self.text_record_proj(pooled), dim=-1)

    def embed_record(self, fused: FusionOutput) -> Tensor:
        """The record embedding of a fusion output: its CLS projected and L2-normalised."""
        return F.normalize(self.record_proj(fused.cls), dim=-1)

    def _fuse_states(
        self,
        image_states: Tensor | None,
        text_states: Tensor | None,
        attention_mask: Tensor | None,
        tabular_hidden: Tensor | None,
        present: Mapping[str, Tensor | None],
    ) -> FusionOutput:
        inputs: dict[str, ModalityTokens] = {}
        if image_states is not None:
            inputs["image"] = self._tokens(self.image_to_fusion(image_states), present.get("image"))
        if text_states is not None:
            if attention_mask is None:
                raise ValueError("text states need their attention mask")
            padding = ~attention_mask.bool()
            inputs["text"] = self._tokens(self.text_to_fusion(text_states), present.get("text"), padding)
        if tabular_hidden is not None:
            token = self.tabular_to_fusion(tabular_hidden).unsqueeze(1)
            inputs["tabular"] = self._tokens(token, present.get("tabular"))
        return self.fusion(inputs)

    @staticmethod
    def _tokens(tokens: Tensor, present: Tensor | None, padding: Tensor | None = None) -> ModalityTokens:
        hidden = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        if padding is not None:
            hidden = hidden | padding
        if present is not None:
            hidden = hidden | ~present.bool().unsqueeze(1)
        return ModalityTokens(tokens=tokens, hidden=hidden)

    def _modality_dropout(self, available: list[str], like: Tensor) -> dict[str, Tensor]:
        """Per-sample presence of each available modality; at least one kept per sample. All kept in eval."""
        batch, device = like.shape[0], like.device
        if not self.training:
            return {}
        probs = self.config.modality_dropout
        keep = {m: torch.rand(batch, device=device) >= getattr(probs, m) for m in available}
        none_kept = ~torch.stack(list(keep.values())).any(dim=0)
        rescue = torch.randint(len(available), (batch,), device=device)
        return {m: keep[m] | (none_kept & (rescue == i)) for i, m in enumerate(available)}

    def _reconstruction_loss(self, pixels: Tensor) -> Tensor:
        assert self.image_decoder is not None
        ratio = self.config.losses.image_mask_ratio
        keep, masked = random_patch_mask(pixels.shape[0], self.image.num_patches, ratio, pixels.device)
        visible = self.image.forward_visible(pixels, keep)[:, self.image.num_prefix_tokens :]
        pred = self.image_decoder(visible, keep)
        target = patchify(pixels, self.image.patch_size)
        if self.config.image_decoder.norm_pixels:
            target = normalize_patches(target)
        return masked_patch_loss(pred, target, masked)

    def _mlm_loss(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        assert self.mlm_head is not None
        text = self.config.text
        maskable = maskable_tokens(input_ids, attention_mask, self.special_token_ids)
        masked_ids, labels = mask_tokens(
            input_ids, maskable, text.mask_token_id, self.text.vocab_size, self.config.losses.text_mask_prob
        )
        states = self.text(masked_ids, attention_mask)
        picked = labels != -100
        # Decode only the picked positions: the vocabulary projection is the costly part.
        logits = self.mlm_head(states[picked], self.text.word_embeddings)
        return weighted_cross_entropy(logits, labels[picked])
