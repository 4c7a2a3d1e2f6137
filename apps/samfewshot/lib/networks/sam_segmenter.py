"""Multi-class SAM: the part HF-SAM and MASG-SAM share.

A slice in [0, 1] (no ImageNet mean/std, as SAMed/H-SAM and LiteMedSAM) is repeated to three channels, min-max
normalised per slice where the backbone was trained so (LiteMedSAM), and encoded by the backbone's image encoder.
The mask decoder has one mask token per class (background included), so a softmax over its mask logits is the class
posterior, and it runs in two ways on the same image embedding:

* prompt-free (``decode``): SAM's default sparse/dense prompt embeddings; the automatic segmentation;
* prompted (``decode_prompted``): points, a box and a previous mask (SAM's mask prompt, for the next click or the
  next slice of a propagation) through SAM's prompt encoder. An annotator prompts for one class c: the answer is
  that class against all others, ``object_logit`` = l_c - logsumexp(l_k, k != c), whose sigmoid is the softmax
  probability of c. The class tokens, already trained on the labels, thereby start the interaction from the
  automatic segmentation, and prompt-aware training teaches them to follow clicks.

A third way, ``decode_object``, is SAM's own class-agnostic decoding of the prompted object: the pretrained mask
tokens (``object_tokens``, SAM's four), their hypernetwork heads (``object_heads``) and SAM's mask-quality head
(``object_quality``) on the image embedding before any hook. With the base weights it is the pretrained model's
answer to a box or clicks (for LiteMedSAM's single-mask output exactly the official ``MedSAM_Lite`` forward), so
prompts work before any class was trained. One click alone is ambiguous (a part, the whole): as SAM's predictor
does, it gets SAM's three-mask output and the mask its quality head rates best.

Models differ only in the hooks, which both ways run: ``tap_projection`` (how an encoder tap becomes a decoder
feature), ``fuse_before`` (image embedding before the two-way transformer), ``class_tokens`` (the mask tokens),
``extra_tokens`` (output tokens after them whose outputs no head reads), ``fuse_after`` (image tokens after the
transformer), ``refine_upscaled`` (upscaled features before the hypernetwork product) and ``training_loss``.

LoRA goes on the query and value projections of every encoder attention block (rank ``lora_rank``), as SAMed and
HF-SAM. The encoder's BatchNorm layers (TinyViT's) stay in eval mode while training: their statistics are base weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from torch import nn

from .litemedsam_backbone import freeze_batch_norm
from .lora import apply_lora, mark_trainable, split_qkv
from .sam_backbone import (
    CheckpointError,
    EncoderSpec,
    build_mask_decoder,
    build_prompt_encoder,
    get_encoder_spec,
    seeded_init,
)

# SAM's point labels: background, foreground, a box's top-left and bottom-right corner; -1 is padding.
BACKGROUND, FOREGROUND, BOX_TOP_LEFT, BOX_BOTTOM_RIGHT, PADDING = 0, 1, 2, 3, -1
# SAM's MaskDecoder default iou_head_hidden_dim: the width of its mask-quality (IoU) head.
SAM_IOU_HEAD_WIDTH = 256


@dataclass
class Prompts:
    """SAM prompts for a batch, in model-input pixels (x = column, y = row).

    ``points`` (B, N, 2) with ``point_labels`` (B, N): ``FOREGROUND``, ``BACKGROUND``, a box as its two corners
    (``BOX_TOP_LEFT``, ``BOX_BOTTOM_RIGHT``, the way SAM embeds boxes, so items of a batch may have a box or not)
    and ``PADDING``. ``masks`` (B, 1, 4h, 4w): logits of a previous mask at the decoder's resolution (SAM's mask
    prompt), used where ``mask_valid`` (B,) is true.
    """

    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    mask_valid: torch.Tensor | None = None


@dataclass
class SliceFeatures:
    """What the hooks may read: the encoder input (B, 3, S, S), the projected encoder taps and the image embedding
    (B, C, h, w) before any hook (``decode_object`` reads it)."""

    image: torch.Tensor
    taps: list[torch.Tensor]
    embedding: torch.Tensor | None = None

    def select(self, i: int) -> SliceFeatures:
        """Item ``i`` of the batch, as a batch of one."""
        return SliceFeatures(
            self.image[i : i + 1], [t[i : i + 1] for t in self.taps], None if self.embedding is None else self.embedding[i : i + 1]
        )

    @staticmethod
    def cat(items: list[SliceFeatures]) -> SliceFeatures:
        """Batches of features -> one batch."""
        embeddings = [f.embedding for f in items]
        return SliceFeatures(
            torch.cat([f.image for f in items]),
            [torch.cat(t) for t in zip(*(f.taps for f in items))],
            None if any(e is None for e in embeddings) else torch.cat(embeddings),
        )


class ChannelSpatialAttention(nn.Module):
    """CBAM-style attention: channel weights from a shared MLP on average- and max-pooled descriptors, then a
    spatial map from a conv over the channel-wise mean and max; (B, C, h, w) -> (B, C, h, w).

    Args:
        channels: C, the channels of the input (and output).
        reduction: the channel MLP's hidden width is ``channels // reduction``.
        spatial_kernel: side of the spatial map's conv kernel (odd, so the map keeps the input's size).
    """

    def __init__(self, channels: int, reduction: int = 4, spatial_kernel: int = 7):
        super().__init__()
        self.channel_mlp = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(inplace=True), nn.Conv2d(channels // reduction, channels, 1)
        )
        self.spatial_conv = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.sigmoid(self.channel_mlp(x.mean((2, 3), keepdim=True)) + self.channel_mlp(x.amax((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.spatial_conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)))


class ImageEncoding(nn.Module):
    """``SamSegmenter.encode`` as one graph for an inference engine: (B, 3, S, S) -> (embedding, *taps), a flat tuple
    (``unflatten`` turns it back into ``encode``'s result).

    Args:
        network: the segmenter whose encoder (and tap projections) run; shared, not copied. S is its ``spec.img_size``.
    """

    def __init__(self, network: SamSegmenter):
        super().__init__()
        self.network = network
        self.input_shape = (3, network.spec.img_size, network.spec.img_size)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embedding, taps = self.network.encode(image)
        return (embedding, *taps)

    @staticmethod
    def unflatten(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return outputs[0], list(outputs[1:])


def mark_unannotated(label: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """Class ids (B, C, H, W), channel 0 the classes, and the classes each label annotates (B, K) bool -> the same
    with channel 0's background of a partly annotated label set to ``-sum(2**c)`` over the classes c it does not
    annotate: there the truth is "background or one of those", as when an annotator drew only a new structure."""
    if annotated.shape[1] > 62:
        raise ValueError(f"a partly annotated label's classes are marked as bits of an int64: at most 62 classes, got {annotated.shape[1]}")
    powers = 2 ** torch.arange(annotated.shape[1], device=label.device)
    hidden = ((~annotated.bool()).long().to(label.device) * powers).sum(1).view(-1, 1, 1, 1)
    classes = label[:, :1]
    return torch.cat([torch.where((classes == 0) & (hidden > 0), -hidden, classes), label[:, 1:]], dim=1)


def marginalise_unannotated(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Class logits (B, K, H, W) and class ids (B, 1, H, W) marked by ``mark_unannotated`` -> logits and ids for
    any softmax loss: at a marked pixel background's logit becomes the log-sum-exp of background's and of the
    classes it may hide, whose own logits leave the softmax, and the id becomes background. Cross-entropy is then
    -log(p_background + p_hidden) (the marginal loss of partly labelled data), Dice counts those probabilities as
    background."""
    unsure = target < 0
    if not bool(unsure.any()):
        return logits, target
    classes = torch.arange(logits.shape[1], device=logits.device).view(1, -1, 1, 1)
    hidden = unsure & (((-target).clamp(min=0) >> classes) & 1).bool()  # (B, K, H, W); bit 0 is never set
    merged = torch.logsumexp(logits.masked_fill(~(hidden | (classes == 0)), float("-inf")), dim=1, keepdim=True)
    background = torch.where(unsure, merged, logits[:, :1])
    return torch.cat([background, logits[:, 1:]], dim=1).masked_fill(hidden, -1e4), target.clamp(min=0)


class SamSegmenter(nn.Module):
    """SAM as a semantic segmenter of ``num_classes`` classes (background included).

    forward: (B, 1 or 3, H, W) in [0, 1] -> logits (B, num_classes, H, W); inputs are resized to ``spec.img_size``.

    Args:
        spec: geometry of the backbone's image encoder, prompt encoder and mask decoder (``get_encoder_spec``).
        num_classes: classes including the background (>= 2); the decoder gets one mask token and head per class.
        tap_indexes: encoder blocks (numbered as the spec's tap-able blocks) whose outputs the hooks read, each
            projected to ``spec.prompt_dim``; () for none.
    """

    #: parameter-name prefixes that train beside the LoRA weights; subclasses add their own modules
    trainable_prefixes: tuple[str, ...] = ("prompt_encoder.", "mask_decoder.", "tap_projections.")
    #: LoRA rank when the server's ``lora_rank`` is not set
    default_lora_rank: int = 4

    def __init__(self, spec: EncoderSpec, num_classes: int, tap_indexes: tuple[int, ...] = ()):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.spec = spec
        self.num_classes = num_classes
        self.tap_indexes = tuple(tap_indexes)
        self.image_encoder = spec.build_encoder()
        self.prompt_encoder = build_prompt_encoder(spec)
        self.mask_decoder = build_mask_decoder(spec, num_classes)
        self.tap_projections = nn.ModuleList(self.tap_projection(spec.tap_channels(i)) for i in self.tap_indexes)
        # SAM's own mask tokens and first hypernetwork head, as pretrained: the class-agnostic object decoding.
        self.object_tokens = nn.Embedding(4, spec.prompt_dim)
        self.object_heads = nn.ModuleList(MLP(spec.prompt_dim, spec.prompt_dim, spec.prompt_dim // 8, 3) for _ in range(4))
        self.object_quality = MLP(spec.prompt_dim, SAM_IOU_HEAD_WIDTH, 4, 3)
        self.segmentation_loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=0.1, lambda_dice=0.9)
        self.object_loss = DiceCELoss(sigmoid=True, lambda_ce=0.1, lambda_dice=0.9)
        # Monte-Carlo dropout on the decoder's image tokens, set only while estimating uncertainty.
        self.mc_dropout = 0.0

    def train(self, mode: bool = True) -> SamSegmenter:
        super().train(mode)
        freeze_batch_norm(self.image_encoder)
        return self

    def tap_projection(self, channels: int) -> nn.Module:
        """(B, channels, h, w) encoder tap -> (B, prompt_dim, h, w); like SAM's neck, a 1x1 conv + LayerNorm2d."""
        return nn.Sequential(nn.Conv2d(channels, self.spec.prompt_dim, 1, bias=False), LayerNorm2d(self.spec.prompt_dim))

    def project_taps(self, taps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder taps (B, channels, h, w) -> (B, prompt_dim, h, w)."""
        return [proj(t) for proj, t in zip(self.tap_projections, taps)]

    def fuse_before(self, embedding: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        """(B, C, h, w) image embedding before the two-way transformer."""
        return embedding

    def class_tokens(self) -> torch.Tensor:
        """(K, C) mask tokens, one per class."""
        return self.mask_decoder.mask_tokens.weight

    def extra_tokens(self) -> torch.Tensor:
        """(E, C) output tokens after the mask tokens; the transformer attends to them, no head reads their output."""
        return self.mask_decoder.mask_tokens.weight[:0]

    def fuse_after(self, tokens: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        """(B, C, h, w) image tokens after the two-way transformer."""
        return tokens

    def refine_upscaled(self, upscaled: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        """(B, C/8, 4h, 4w) upscaled features before the hypernetwork product."""
        return upscaled

    def training_loss(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Loss of the last training forward. ``logits`` (B, K, H, W) prompt-free class logits, or (B, 2K, H, W)
        with the prompted decoding's after them; ``label`` (B, 1, H, W) class ids, or (B, 2, H, W) with the prompted
        object after them: its class id c inside, 0 outside, -1 everywhere for a slice that got no prompt (no object
        loss). A negative class id marks a pixel of a partly annotated label (``mark_unannotated``): the loss takes
        its background and the classes it may hide as one (``marginalise_unannotated``). The object loss reads the
        prompted decoding as c against the rest (``object_logit``). Computed in fp32 whatever precision the logits
        come in (a bf16 autocast forward)."""
        k, logits = self.num_classes, logits.float()
        loss = self.segmentation_loss(*marginalise_unannotated(logits[:, :k], label[:, :1]))
        if logits.shape[1] > k and label.shape[1] > 1:
            prompted = label[:, 1].flatten(1).amax(1)
            rows = torch.nonzero(prompted > 0).flatten()
            if len(rows):
                target = label[rows, 1:] > 0
                loss = loss + self.object_loss(self.object_logit(logits[rows, k:], prompted[rows]), target.float())
        return loss

    @staticmethod
    def object_logit(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Class logits (B, K, ...) -> log-odds (B, 1, ...) of class ``classes`` (B,) against all others."""
        chosen = logits.gather(1, classes.long().view(-1, *[1] * (logits.dim() - 1)).expand(-1, 1, *logits.shape[2:]))
        others = logits.scatter(1, classes.long().view(-1, *[1] * (logits.dim() - 1)).expand(-1, 1, *logits.shape[2:]), float("-inf"))
        return chosen - torch.logsumexp(others, dim=1, keepdim=True)

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Everything that depends on the image alone: (B, 3, S, S) model input -> image embedding (B, C, h, w)
        and projected taps [(B, C, h, w)]. Prompts only enter after it, so a caller may reuse its result."""
        embedding, taps = self.spec.encode_with_taps(self.image_encoder, image, self.tap_indexes)
        return embedding, self.project_taps(taps)

    def image_encoding(self) -> ImageEncoding:
        """The image-dependent part (``encode``) as a module of its own, for an inference engine."""
        return ImageEncoding(self)

    def model_input(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1 or 3, H, W) in [0, 1] -> the image encoder's input (B, 3, S, S): three channels, the model size,
        and each slice stretched to [0, 1] where the backbone was trained so (``spec.minmax_per_slice``)."""
        if image.shape[1] == 1:
            image = image.expand(-1, 3, -1, -1)
        model_size = (self.spec.img_size, self.spec.img_size)
        if tuple(image.shape[-2:]) != model_size:
            image = F.interpolate(image, size=model_size, mode="bilinear", align_corners=False)
        if self.spec.minmax_per_slice:
            low = image.amin((1, 2, 3), keepdim=True)
            image = (image - low) / (image.amax((1, 2, 3), keepdim=True) - low).clamp_min(1e-8)
        return image

    def prepare(
        self, image: torch.Tensor, encode: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]] | None = None
    ) -> tuple[torch.Tensor, SliceFeatures]:
        """(B, 1 or 3, H, W) in [0, 1] -> the fused image embedding (B, C, h, w) both decodings start from, and the
        features the hooks read. ``encode`` replaces ``self.encode`` (e.g. a lookup of embeddings computed before)."""
        image = self.model_input(image)
        embedding, taps = (encode or self.encode)(image)
        features = SliceFeatures(image=image, taps=taps, embedding=embedding)
        return self.fuse_before(embedding, features), features

    def forward(
        self,
        image: torch.Tensor,
        prompts: Prompts | None = None,
        encode: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]] | None = None,
        decoder_resolution: bool = False,
    ) -> torch.Tensor:
        """(B, 1 or 3, H, W) -> class logits (B, K, H, W); with ``prompts`` the prompted decoding's follow (B, 2K,
        H, W), both from one encoding (training runs both on every slice). ``decoder_resolution``: the decoder's
        logits as they are, (B, K or 2K, 4h, 4w), where SAMed's recipe computes its loss."""
        size = image.shape[-2:]
        embedding, features = self.prepare(image, encode)
        masks = self.decode(embedding, features)
        if prompts is not None:
            masks = torch.cat([masks, self.decode_prompted(embedding, features, prompts)], dim=1)
        return masks if decoder_resolution else F.interpolate(masks, size=size, mode="bilinear", align_corners=False)

    def decode(self, embedding: torch.Tensor, features: SliceFeatures) -> torch.Tensor:
        """Class logits (B, K, 4h, 4w) of a fused embedding, prompt-free (SAM's default prompt embeddings)."""
        b = embedding.shape[0]
        sparse = torch.empty((b, 0, self.spec.prompt_dim), device=embedding.device, dtype=embedding.dtype)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, *embedding.shape[-2:])
        return self._decode(embedding, features, sparse, dense)

    def decode_prompted(self, embedding: torch.Tensor, features: SliceFeatures, prompts: Prompts) -> torch.Tensor:
        """Class logits (B, K, 4h, 4w) of a fused embedding with ``prompts``."""
        sparse, dense = self.embed_prompts(prompts, embedding.shape[0], embedding.shape[-2:])
        return self._decode(embedding, features, sparse, dense)

    def decode_object(self, features: SliceFeatures, prompts: Prompts) -> torch.Tensor:
        """Logits (B, 1, 4h, 4w) of the prompted object by SAM's own decoding (``object_tokens``, ``object_heads``)
        of the image embedding before any hook (``features.embedding``): the single-mask output (token 0), or for an
        item prompted by one foreground click alone, the one of the three-mask output (tokens 1-3) that
        ``object_quality`` rates best, as ``SamPredictor`` with ``multimask_output=True``."""
        embedding = features.embedding
        b, c, h, w = embedding.shape
        decoder = self.mask_decoder
        sparse, dense = self.embed_prompts(prompts, b, (h, w))
        tokens = torch.cat([decoder.iou_token.weight, self.object_tokens.weight], dim=0)
        tokens = torch.cat([tokens[None].expand(b, -1, -1), sparse.to(tokens.dtype)], dim=1)
        pos = self.prompt_encoder.get_dense_pe().expand(b, -1, -1, -1)
        hs, src = decoder.transformer(embedding + dense, pos, tokens)
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        size, upscaled = upscaled.shape[-2:], upscaled.flatten(2)
        single = self.object_heads[0](hs[:, 1])[:, None] @ upscaled
        labels = prompts.point_labels
        one_click = torch.zeros(b, dtype=torch.bool, device=embedding.device)
        if labels is not None:
            one_click = ((labels != PADDING).sum(1) == 1) & ((labels == FOREGROUND).sum(1) == 1)
        if bool(one_click.any()):
            heads = torch.stack([self.object_heads[i](hs[:, 1 + i]) for i in (1, 2, 3)], dim=1)  # (B, 3, C/8)
            best = self.object_quality(hs[:, 0])[:, 1:].argmax(1)
            chosen = heads.gather(1, best.view(b, 1, 1).expand(-1, 1, heads.shape[-1])) @ upscaled
            single = torch.where(one_click.view(b, 1, 1), chosen, single)
        return single.view(b, 1, *size)

    def embed_prompts(self, prompts: Prompts, batch: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's ``PromptEncoder.forward`` for ``Prompts``: box corners are points with their own labels, and each
        item's mask prompt is used only where ``mask_valid``. -> sparse (B, N (+ 1), C), dense (B, C, h, w)."""
        encoder = self.prompt_encoder
        device = encoder.no_mask_embed.weight.device
        sparse = torch.empty((batch, 0, self.spec.prompt_dim), device=device)
        if prompts.points is not None:
            points, labels = prompts.points.float(), prompts.point_labels
            # SAM pads point prompts with one "not a point" unless a box is given (its _embed_points, pad=boxes is
            # None); in a batch, unless every item has a box.
            if not bool((labels == BOX_TOP_LEFT).any(1).all()):
                points = torch.cat([points, torch.zeros(batch, 1, 2, device=device)], dim=1)
                labels = torch.cat([labels, torch.full((batch, 1), PADDING, device=device)], dim=1)
            points, labels = points + 0.5, labels[..., None]
            position = encoder.pe_layer.forward_with_coords(points, encoder.input_image_size)
            sparse = torch.where(labels == PADDING, encoder.not_a_point_embed.weight, position)
            for kind, embedding in enumerate(encoder.point_embeddings):
                sparse = sparse + (labels == kind) * embedding.weight
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(batch, -1, *size)
        if prompts.masks is not None:
            valid = torch.ones(batch, dtype=torch.bool, device=device) if prompts.mask_valid is None else prompts.mask_valid
            dense = torch.where(valid[:, None, None, None], encoder.mask_downscaling(prompts.masks.float()), dense)
        return sparse, dense

    def _decode(self, embedding: torch.Tensor, features: SliceFeatures, sparse: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """SAM's ``MaskDecoder.predict_masks`` with the hooks and one mask token per class; -> (B, K, 4h, 4w)."""
        decoder = self.mask_decoder
        b, c, h, w = embedding.shape
        tokens = torch.cat([decoder.iou_token.weight, self.class_tokens(), self.extra_tokens()], dim=0)
        tokens = torch.cat([tokens[None].expand(b, -1, -1), sparse.to(tokens.dtype)], dim=1)
        src = embedding + dense
        pos = self.prompt_encoder.get_dense_pe().expand(b, -1, -1, -1)
        hs, src = decoder.transformer(src, pos, tokens)
        src = self.fuse_after(src.transpose(1, 2).reshape(b, c, h, w), features)
        if self.mc_dropout:
            src = F.dropout(src, self.mc_dropout, training=True)
        upscaled = self.refine_upscaled(decoder.output_upscaling(src), features)
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1)  # (B, K, C/8)
        return (hyper @ upscaled.flatten(2)).view(b, self.num_classes, *upscaled.shape[-2:])

    def load_sam_state(self, official: dict[str, torch.Tensor]) -> None:
        """Load an official SAM state dict already adapted to ``spec`` (``lib.weights.load_official_checkpoint``/
        ``adapt_official_state``); call before ``add_lora``.

        SAM has four pretrained mask tokens and hypernetwork heads, LiteMedSAM one (it was trained with single-mask
        output; ``spec.pretrained_mask_tokens``): class k starts from token ``k % n`` of those, so every class begins
        from a pretrained mask head. SAM's four tokens, heads and IoU head also serve the object decoding.
        """
        state = dict(official)
        quality = "mask_decoder.iou_prediction_head."
        for key in [k for k in state if k.startswith(quality)]:
            state["object_quality." + key[len(quality) :]] = state.pop(key)
        tokens = state["mask_decoder.mask_tokens.weight"]
        state["object_tokens.weight"] = tokens
        for key, value in list(state.items()):
            if key.startswith("mask_decoder.output_hypernetworks_mlps."):
                state["object_heads." + key.split(".", 2)[2]] = value
        n_official = min(tokens.shape[0], self.spec.pretrained_mask_tokens)
        state["mask_decoder.mask_tokens.weight"] = tokens[[k % n_official for k in range(self.num_classes)]]
        hyper = "mask_decoder.output_hypernetworks_mlps."
        official_heads = {k: v for k, v in state.items() if k.startswith(hyper)}
        for key in official_heads:
            del state[key]
        for k in range(self.num_classes):
            for key, value in official_heads.items():
                index, rest = key[len(hyper) :].split(".", 1)
                if int(index) == k % n_official:
                    state[f"{hyper}{k}.{rest}"] = value
        own = set(self.state_dict())
        missing = [k for k in own if k not in state and k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.", "object_"))]
        if missing:
            raise CheckpointError(f"truncated SAM checkpoint: {len(missing)} tensors are missing, e.g. {missing[:3]}")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

    def add_lora(self, rank: int) -> None:
        """LoRA on the query and value projections of every encoder block; afterwards only LoRA and
        ``trainable_prefixes`` train."""
        split_qkv(self, self.spec.qkv_pattern, per_head=self.spec.qkv_per_head)
        apply_lora(self, rank=rank, target_modules=self.spec.qkv_pattern + r"\.[qv]")
        mark_trainable(self, self.trainable_prefixes)


def build_segmenter(
    model_cls: type[SamSegmenter],
    backbone: str,
    num_classes: int,
    lora_rank: int | None = None,
    sam_state: dict[str, torch.Tensor] | None = None,
    **model_kwargs,
) -> SamSegmenter:
    """Build ``model_cls(spec, num_classes, **model_kwargs)`` with LoRA of rank ``lora_rank`` (default: the model's
    ``default_lora_rank``), from an official SAM state dict adapted to the backbone when given
    (``lib.weights.load_official_checkpoint`` reads one from its file).

    Random initialisation is seeded, so every process (server, training subprocess) builds the same
    frozen backbone and an adapter trained in one applies in another.
    """
    spec = get_encoder_spec(backbone)
    with seeded_init():
        model = model_cls(spec, num_classes, **model_kwargs)
        if sam_state is not None:
            model.load_sam_state(sam_state)
        model.add_lora(lora_rank or model_cls.default_lora_rank)
    return model
