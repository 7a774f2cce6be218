"""EhrPrsConfig: the decoder's dimensions plus how (and whether) it reads polygenic risk scores.

This file imports only transformers (and huggingface_hub, which transformers itself requires and
whose strict dataclass checks its own configs) so it can travel with a checkpoint as hub remote
code (`trust_remote_code=True`). Presets (`EhrPrsConfig.from_preset("tiny" | "small" | "paper")`) fix
the architecture; the vocabulary size and the number of scores come from the data:

    config = EhrPrsConfig.from_preset("small", vocab_size=len(tokenizer), n_prs=3481, prs_fusion="prefix")
"""

# No `from __future__ import annotations`: the strict dataclass checks each field against its
# annotation, which must be a real type (a string annotation would silently skip the check).
from typing import Any, Literal, get_args

from huggingface_hub.dataclasses import strict, validated_field  # as transformers' own model configs
from transformers import PretrainedConfig

PrsFusion = Literal["none", "prefix", "cross_attention", "logit_bias"]
PRS_FUSIONS: tuple[str, ...] = get_args(PrsFusion)

# Default time bins of the time-to-event head, in days after a position (the last is open-ended):
# a month, a quarter, half a year, 1, 2, 3, 5 and 10 years.
DEFAULT_TTE_TIME_BINS = [0.0, 30.0, 91.0, 182.0, 365.0, 730.0, 1095.0, 1826.0, 3650.0]

# Architecture presets (sizes without the PRS adapter; checked in tests/test_modeling.py).
PRESETS: dict[str, dict[str, Any]] = {
    # Unit tests: ~0.1 M parameters (107 k with vocab 512), runs in milliseconds.
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, prs_tokens=4, prs_adapter_hidden_size=32,
    ),
    # CPU pretraining on 2 cores: 2.62 M non-embedding parameters (4 x 655 k), head_dim 64;
    # ~2,700 training tokens/s on one thread at batch 8 x 512 (benchmarks/adapter_overhead.py).
    "small": dict(
        vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=1024, prs_tokens=10, prs_adapter_hidden_size=128,
    ),
    # The paper's model: hidden 960, 12 layers, 8 heads, context 2,048, 3,481 PGS Catalog scores
    # (133 M non-embedding parameters; vocab_size comes from the tokenizer).
    "paper": dict(
        vocab_size=32768, hidden_size=960, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=2048, prs_tokens=10, prs_adapter_hidden_size=512,
        n_prs=3481,
    ),
}


# Field constraints, declared the transformers 5 way: huggingface_hub's strict dataclass checks a
# field's type (its annotation) and then these validators on every assignment, so a wrong value
# fails where it is set, named in the error ("Validation error for field 'hidden_size': ...").
# Rules between fields are the `validate_*` methods, run after __init__, by the model and on save.


def _integer(minimum: int, default: int | None) -> Any:
    """A field holding an integer >= minimum (or None where the annotation allows it)."""
    def check(value: int | None) -> None:
        if value is not None and value < minimum:
            raise ValueError(f"must be an integer >= {minimum}, got {value!r}")
    return validated_field(check, default=default)


def _positive(default: float) -> Any:
    """A field holding a number > 0."""
    def check(value: float) -> None:
        if not value > 0:
            raise ValueError(f"must be a positive number, got {value!r}")
    return validated_field(check, default=default)


def _probability(value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be a probability in [0, 1], got {value!r}")


def _non_negative(value: float) -> None:
    if not value >= 0:
        raise ValueError(f"must be a number >= 0, got {value!r}")


def _code_families(value: list[str] | None) -> None:
    if value is None:
        return
    if not all(value):
        raise ValueError(f"must be a list of code family strings, got {value!r}")
    if len(set(value)) != len(value):
        raise ValueError(f"has duplicates: each code family may appear once, got {value!r}")


def _time_bins(value: list[float] | None) -> None:
    if value is None:
        return
    if not value:
        raise ValueError(f"must be a list of bin edges in days, got {value!r}")
    if value[0] != 0 or any(b <= a for a, b in zip(value, value[1:])):
        raise ValueError(f"edges must start at 0 and be strictly increasing (days), got {list(value)}")


@strict
class EhrPrsConfig(PretrainedConfig):
    r"""Configuration of `EhrPrsForCausalLM` / `EhrPrsForSequenceClassification`.

    Decoder (standard Hugging Face names; a Llama-style pre-norm decoder):
        vocab_size (int): number of tokens (the tokenizer's vocabulary, specials included).
        hidden_size (int): width of the residual stream.
        intermediate_size (int): width of the SwiGLU MLP.
        num_hidden_layers (int): number of decoder layers.
        num_attention_heads (int): query heads; must divide `hidden_size`.
        num_key_value_heads (int | None): key/value heads (grouped-query attention); must divide
            `num_attention_heads`. None = `num_attention_heads` (plain multi-head attention).
        max_position_embeddings (int): longest sequence the model is meant for, the PRS prefix
            (`prs_tokens` in prefix mode) included. Rotary positions do not enforce it.
        rms_norm_eps (float): epsilon of the RMSNorms.
        rope_parameters (dict | None): transformers-5 RoPE convention, e.g. {"rope_type": "default",
            "rope_theta": 10000.0}; passing `rope_theta=` is accepted and converted. Only "default"
            RoPE is implemented.
        initializer_range (float): std of the normal initialisation of linear and embedding weights.
        use_cache (bool): return a KV cache from forward in eval mode by default.
        tie_word_embeddings (bool): share the input embedding matrix with the LM head (default True).
        pad_token_id / bos_token_id / eos_token_id (int | None): special token ids (set them from the
            tokenizer). Padded positions must also be 0 in `attention_mask`.

    Genomic adapter:
        n_prs (int): number of polygenic risk scores per subject (columns of the PRS table; the paper
            uses 3,481). 0 = an EHR-only dataset: every subject gets the learned "no genotype" tokens.
        prs_fusion (str): how the PRS reach the decoder, one of "none" (EHR-only baseline: no adapter
            at all), "prefix" (the adapter's `prs_tokens` embeddings sit before the event tokens as a
            soft prompt) or "cross_attention" (the adapter's tokens are a memory that the layers in
            `prs_cross_attention_layers` read through tanh-gated cross-attention whose output
            projection starts at 0, so an EHR-only checkpoint extended this way gives identical
            outputs before training), or "logit_bias" (the scores shift every next-token logit by a
            linear function of them, logits + down(prs) @ up.T, and nothing else: each code's odds are
            multiplied by exp(w . prs), a proportional-hazards genetic effect on the decoder's
            predictions; zero for a subject without genotype, and `up` starts at 0, so an extended
            EHR-only checkpoint starts unchanged. On a frozen backbone `ehr-prs pretrain` fits it in
            closed form, see ehr_prs/fits/logit_bias.py).
        prs_tokens (int): number of embedding vectors the adapter makes from one PRS vector (paper: 10).
        prs_adapter_hidden_size (int): hidden width of the adapter MLP (n_prs -> this -> prs_tokens x
            hidden_size).
        prs_cross_attention_layers (list[int] | None): decoder layer indices that get a gated
            cross-attention block. None = every other layer starting at 0 ([0, 2, 4, ...]); the
            resolved list is what gets saved. Used only when prs_fusion == "cross_attention".
        prs_dropout (float): probability, in training mode only, of hiding a genotyped subject's PRS
            (replacing them by the "no genotype" tokens), so one model serves genotyped and
            non-genotyped people. 0 disables it.
        prs_centered (bool): cross_attention only. Each block adds tanh(gate) * (CrossAttention(h,
            memory of the subject's PRS) - CrossAttention(h, memory of all-zero PRS)): the adapter
            moves a prediction only as far as the scores deviate from the population mean (0 after
            standardisation), and a subject without genotype (or whose PRS is hidden by
            prs_dropout) gets exactly the decoder's own output. With a frozen EHR-only backbone this
            makes the EHR+PRS model the EHR-only model plus a genetic effect, nothing else.
            Default False (the adapter may also shift everyone, through the "no genotype" tokens).
        prs_logit_bias_rank (int): logit_bias only: rank of the scores -> logits map (`down`: n_prs -> r
            genetic liabilities, `up`: r -> vocab_size), so a 3,481-score panel over a 30,000-token
            vocabulary needs r x 33 k weights, not 100 M. Centred by construction (all-zero scores or
            no genotype add exactly 0), so prs_centered does not apply.

    Time-to-event head (MOTOR / Delphi style; see EhrPrsTimeToEventHead):
        tte_families (list[str]): the code families (a MEDS code up to its first '.', e.g.
            `ICD10CM/E11`) whose first later occurrence the head predicts from every position.
            Empty = no head (the LM alone). `ehr-prs pretrain` chooses them from the training split:
            families first seen in at least 20 training subjects (the All of Us rule,
            ehr_prs.privacy.MIN_SUBJECTS, which this file cannot import), the most common first.
        tte_time_bins (list[float]): left edges of the piecewise-constant hazard's bins, in days after
            the position: strictly increasing, starting at 0; the last bin is open-ended.
        tte_rank (int): rank of the head: hidden -> (bins x rank), times a (families x rank) table, so
            the head costs hidden x bins x rank + families x (rank + bins) weights (MOTOR's factorisation).
        tte_loss_weight (float): pretraining optimises LM loss + tte_loss_weight x TTE loss (the mean
            piecewise-exponential negative log-likelihood per at-risk (position, family) pair).
        tte_max_positions (int): positions per sequence at which the TTE loss is read (the ends of
            days, evenly spread over the record when there are more).
        tte_prs_rank (int): rank of the genomic adapter on hazards (PRS -> rank liabilities ->
            a log-hazard shift per family, proportional hazards). Used when the model reads the PRS
            (n_prs > 0 and prs_fusion != "none"); 0 turns the shift off.
        tte_history_summary (bool): the head reads, beside a position's own hidden state, the mean of the
            hidden states of the record up to it (a summary of the whole history, which the last
            state alone carries only as far as next-token prediction needed it).

    Constraints are declared the transformers 5 way (huggingface_hub's `@strict` dataclass): a
    field's type and range are checked whenever it is set, the rules between fields (the
    `validate_*` methods) when the config is built, when a model is built from it and when it is
    saved. A wrong value raises huggingface_hub's StrictDataclassFieldValidationError (or
    StrictDataclassClassValidationError) naming the field and what is allowed.
    """

    model_type = "ehr_prs"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = _integer(1, default=1024)
    hidden_size: int = _integer(1, default=256)
    intermediate_size: int = _integer(1, default=512)
    num_hidden_layers: int = _integer(1, default=4)
    num_attention_heads: int = _integer(1, default=4)
    num_key_value_heads: int | None = _integer(1, default=None)
    max_position_embeddings: int = _integer(1, default=2048)
    rms_norm_eps: int | float = _positive(default=1e-5)
    rope_parameters: dict | None = None
    initializer_range: int | float = _positive(default=0.02)
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    n_prs: int = _integer(0, default=0)
    prs_fusion: PrsFusion = "none"
    prs_tokens: int = _integer(1, default=10)
    prs_adapter_hidden_size: int = _integer(1, default=256)
    prs_cross_attention_layers: list[int] | None = None
    prs_dropout: int | float = validated_field(_probability, default=0.1)
    prs_centered: bool = False
    prs_logit_bias_rank: int = _integer(1, default=16)
    tte_families: list[str] | None = validated_field(_code_families, default=None)
    tte_time_bins: list[int | float] | None = validated_field(_time_bins, default=None)
    tte_rank: int = _integer(1, default=32)
    tte_loss_weight: int | float = validated_field(_non_negative, default=1.0)
    tte_max_positions: int = _integer(1, default=32)
    tte_prs_rank: int = _integer(0, default=8)
    tte_history_summary: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.prs_cross_attention_layers is None:
            self.prs_cross_attention_layers = list(range(0, self.num_hidden_layers, 2))
        if self.tte_families is None:
            self.tte_families = []
        if self.tte_time_bins is None:
            self.tte_time_bins = list(DEFAULT_TTE_TIME_BINS)
        if self.rope_parameters is None and "rope_theta" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)  # converts a legacy `rope_theta=` into rope_parameters
        # @strict runs every validate_* method once __init__ returns.

    # --- what the architecture implies: asked here, never re-derived from the strings elsewhere ---

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

    @property
    def num_prefix_tokens(self) -> int:
        """PRS positions in front of the event tokens: `prs_tokens` in prefix mode (with or without scores), else 0."""
        return self.prs_tokens if self.prs_fusion == "prefix" else 0

    @property
    def has_prs_adapter(self) -> bool:
        """Whether the model has the adapter MLP that makes `prs_tokens` embeddings (prefix, cross_attention)."""
        return self.prs_fusion in ("prefix", "cross_attention")

    @property
    def has_cross_attention(self) -> bool:
        """Whether the layers in `prs_cross_attention_layers` have a gated cross-attention block."""
        return self.prs_fusion == "cross_attention"

    @property
    def has_logit_bias(self) -> bool:
        """Whether the LM has the low-rank PRS -> next-token logit shift (logit_bias)."""
        return self.prs_fusion == "logit_bias"

    @property
    def reads_prs(self) -> bool:
        """Whether the model has a genomic adapter that reads the PRS vector."""
        return self.n_prs > 0 and self.prs_fusion != "none"

    @property
    def has_tte_head(self) -> bool:
        """Whether the model has the time-to-event head (tte_families is not empty)."""
        return len(self.tte_families) > 0

    @property
    def tte_hazard_shift(self) -> bool:
        """Whether the genomic adapter also shifts the TTE head's log-hazards (proportional hazards)."""
        return self.has_tte_head and self.reads_prs and self.tte_prs_rank > 0

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "EhrPrsConfig":
        """Build a config from a named preset in PRESETS, with field overrides (e.g. vocab_size, n_prs)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}: choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    # --- rules between fields (@strict runs every validate_* method; the inherited ones too) ---

    def _require(self, *names: str) -> None:
        """None means "derive it" only when the config is built; one set afterwards is an error."""
        for name in names:
            if getattr(self, name) is None:
                raise ValueError(f"{name} is None: give it a value (None means the default only when building)")

    def validate_architecture(self) -> None:
        """Attention heads that fit the residual width, rotary-sized heads, grouped key/value heads."""
        self._require("num_key_value_heads")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"hidden_size / num_attention_heads = {self.head_dim} must be even for rotary positions")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                             f"({self.num_attention_heads})")

    def validate_token_ids(self) -> None:
        """Special tokens inside the vocabulary (transformers only warns, for old hub configs that store e.g. -1)."""
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary: must be in [0, {self.vocab_size - 1}]")

    def validate_rope(self) -> None:
        """Only default RoPE is implemented (this replaces transformers' check of the other RoPE kinds)."""
        rope = self.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters['rope_type'] must be 'default', got {rope.get('rope_type')!r}")
        theta = rope.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise ValueError(f"rope_parameters['rope_theta'] must be a positive number, got {theta!r}")

    def validate_prs_fusion(self) -> None:
        """The genomic adapter's fields agree with its kind and with the decoder's layers."""
        if self.prs_centered and self.prs_fusion == "prefix":
            raise ValueError("prs_centered=True needs prs_fusion='cross_attention' (a prefix always changes what "
                             "the decoder attends to, so it cannot be centred)")
        if self.prs_centered and self.has_logit_bias:
            raise ValueError("prs_centered=True needs prs_fusion='cross_attention': the logit_bias adapter is "
                             "centred by construction (all-zero scores add nothing); leave prs_centered false")
        self._require("prs_cross_attention_layers")
        layers = self.prs_cross_attention_layers
        bad = [i for i in layers if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"prs_cross_attention_layers={list(layers)}: indices must be distinct and in "
                             f"[0, {self.num_hidden_layers - 1}] (num_hidden_layers={self.num_hidden_layers})")
        if self.has_cross_attention and not layers:
            raise ValueError("prs_fusion='cross_attention' needs at least one index in prs_cross_attention_layers")

    def validate_tte(self) -> None:
        """The time-to-event head's lists (their values are checked as fields)."""
        self._require("tte_families", "tte_time_bins")


__all__ = ["EhrPrsConfig", "PRESETS", "PRS_FUSIONS", "PrsFusion", "DEFAULT_TTE_TIME_BINS"]
