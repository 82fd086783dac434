"""The one model config: every size and choice of every model family is a field here."""

from __future__ import annotations

from dataclasses import dataclass

from msit.errors import ConfigError

FAMILIES = ("msit", "msit_no_transfer", "shared_bottom", "mmoe", "star")
FUSIONS = ("attention", "concat", "gate", "sum")


@dataclass
class ModelConfig:
    family: str = "msit"  # one of FAMILIES; the baselines share the embeddings and the interface
    embed_dim: int = 32  # width of every embedding and of the attention layers
    interest_heads: int = 2  # heads of the InterestNetwork's encoder and target-attention pooling
    interest_layers: int = 1  # Transformer encoder layers over the behaviour history
    transfer_heads: int = 2  # heads of the InterestTransfer attention (and of attention fusion)
    transfer_layers: int = 2  # L: layers of attention from the target scene over all scenes
    fusion: str = "attention"  # how h^s and g^s become f^s: one of FUSIONS
    dropout: float = 0.1
    history_length: int = 50  # N: past events in each history window (cut per batch, any length)
    mlp_dims: tuple[int, ...] = (128, 64)  # hidden sizes of the predictor (and the baselines' networks)
    scene_bias: bool = True  # a learned per-scene bias on the logit
    use_text: bool = False  # add frozen text embeddings of items (see `msit data embed-text`)
    text_dim: int = 384  # width of those embeddings (all-MiniLM-L6-v2: 384)
    scene_evidence: bool = False  # add to each scene's interest what its history counts: events, positives, rate
    transfer_pair_bias: bool = False  # a learned per-(target scene, head, source scene) bias on transfer logits
    transfer_kl_weight: float = 0.0  # λ of KL(transfer attention || uniform over scenes)
    num_experts: int = 4  # MMoE
    gap_buckets: int = 24  # log2 buckets of the time gap between a past event and the current one

    def __post_init__(self) -> None:
        self.mlp_dims = tuple(int(d) for d in self.mlp_dims)
        problems = []
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {list(FAMILIES)}, got {self.family!r}")
        if self.fusion not in FUSIONS:
            problems.append(f"fusion must be one of {list(FUSIONS)}, got {self.fusion!r}")
        for name in ("interest_heads", "transfer_heads"):
            heads = getattr(self, name)
            if heads < 1 or self.embed_dim % heads:
                problems.append(f"embed_dim {self.embed_dim} is not divisible by {name} {heads}")
        for name in ("embed_dim", "interest_layers", "transfer_layers", "num_experts", "gap_buckets", "text_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.transfer_kl_weight < 0:
            problems.append(f"transfer_kl_weight must be >= 0, got {self.transfer_kl_weight}")
        if self.history_length < 1:
            problems.append(f"history_length must be at least 1, got {self.history_length}")
        if not self.mlp_dims or min(self.mlp_dims) < 1:
            problems.append(f"mlp_dims must be positive sizes, got {self.mlp_dims}")
        if problems:
            raise ConfigError("invalid model config: " + "; ".join(problems))
