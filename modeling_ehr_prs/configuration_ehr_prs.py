"""EhrPrsConfig: the decoder's dimensions plus how (and whether) it reads polygenic risk scores.

This file imports only torch/transformers so it can travel with a checkpoint as hub remote code
(`trust_remote_code=True`). Presets (`EhrPrsConfig.from_preset("tiny" | "small" | "paper")`) fix
the architecture; the vocabulary size and the number of scores come from the data:

    config = EhrPrsConfig.from_preset("small", vocab_size=len(tokenizer), n_prs=3481, prs_fusion="prefix")
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

PRS_FUSIONS = ("none", "prefix", "cross_attention", "logit_bias")

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
            families first seen in at least 20 training subjects, the most common first.
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

    Every value is checked when the config is built, when a model is built from it and when it is
    saved: a wrong value raises ValueError naming the field and what is allowed.
    """

    model_type = "ehr_prs"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 1024
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_parameters: dict | None = None
    initializer_range: float = 0.02
    use_cache: bool = True
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    n_prs: int = 0
    prs_fusion: str = "none"
    prs_tokens: int = 10
    prs_adapter_hidden_size: int = 256
    prs_cross_attention_layers: list[int] | None = None
    prs_dropout: float = 0.1
    prs_centered: bool = False
    prs_logit_bias_rank: int = 16
    tte_families: list[str] | None = None
    tte_time_bins: list[float] | None = None
    tte_rank: int = 32
    tte_loss_weight: float = 1.0
    tte_max_positions: int = 32
    tte_prs_rank: int = 8
    tte_history_summary: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.prs_cross_attention_layers is None and isinstance(self.num_hidden_layers, int):
            self.prs_cross_attention_layers = list(range(0, self.num_hidden_layers, 2))
        if self.tte_families is None:
            self.tte_families = []
        if self.tte_time_bins is None:
            self.tte_time_bins = list(DEFAULT_TTE_TIME_BINS)
        if self.rope_parameters is None and "rope_theta" not in kwargs:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)  # converts a legacy `rope_theta=` into rope_parameters
        self.validate()

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden_size // self.num_attention_heads

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

    def validate(self) -> None:
        """Check every field (transformers 5 configs accept wrong types silently, so we do it here)."""
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings", "prs_tokens", "prs_adapter_hidden_size",
                    "prs_logit_bias_rank")
        for name in positive:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("n_prs", self.n_prs, minimum=0)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=0)
                if value >= self.vocab_size:
                    raise ValueError(f"{name}={value} is outside the vocabulary: must be in [0, {self.vocab_size - 1}]")
        for name in ("rms_norm_eps", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if isinstance(self.prs_dropout, bool) or not isinstance(self.prs_dropout, (int, float)) \
                or not 0.0 <= self.prs_dropout <= 1.0:
            raise ValueError(f"prs_dropout must be a probability in [0, 1], got {self.prs_dropout!r}")
        if self.prs_fusion not in PRS_FUSIONS:
            raise ValueError(f"prs_fusion must be one of {list(PRS_FUSIONS)}, got {self.prs_fusion!r}")
        if not isinstance(self.prs_centered, bool):
            raise ValueError(f"prs_centered must be true or false, got {self.prs_centered!r}")
        if self.prs_centered and self.prs_fusion == "prefix":
            raise ValueError("prs_centered=True needs prs_fusion='cross_attention' (a prefix always changes what "
                             "the decoder attends to, so it cannot be centred)")
        if self.prs_centered and self.prs_fusion == "logit_bias":
            raise ValueError("prs_centered=True needs prs_fusion='cross_attention': the logit_bias adapter is "
                             "centred by construction (all-zero scores add nothing); leave prs_centered false")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"hidden_size / num_attention_heads = {self.head_dim} must be even for rotary positions")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                             f"({self.num_attention_heads})")
        layers = self.prs_cross_attention_layers
        if not isinstance(layers, (list, tuple)) or not all(type(i) is int for i in layers):
            raise ValueError(f"prs_cross_attention_layers must be a list of layer indices, got {layers!r}")
        bad = [i for i in layers if not 0 <= i < self.num_hidden_layers]
        if bad or len(set(layers)) != len(layers):
            raise ValueError(f"prs_cross_attention_layers={list(layers)}: indices must be distinct and in "
                             f"[0, {self.num_hidden_layers - 1}] (num_hidden_layers={self.num_hidden_layers})")
        if self.prs_fusion == "cross_attention" and not layers:
            raise ValueError("prs_fusion='cross_attention' needs at least one index in prs_cross_attention_layers")
        self._validate_tte()
        rope = self.rope_parameters or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"rope_parameters['rope_type'] must be 'default', got {rope.get('rope_type')!r}")
        theta = rope.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
            raise ValueError(f"rope_parameters['rope_theta'] must be a positive number, got {theta!r}")


    def _validate_tte(self) -> None:
        """The time-to-event head's fields (see the class docstring)."""
        families = self.tte_families
        if not isinstance(families, (list, tuple)) or not all(isinstance(f, str) and f for f in families):
            raise ValueError(f"tte_families must be a list of code family strings, got {families!r}")
        if len(set(families)) != len(families):
            raise ValueError("tte_families has duplicates: each code family may appear once")
        bins = self.tte_time_bins
        if (not isinstance(bins, (list, tuple)) or not bins
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in bins)):
            raise ValueError(f"tte_time_bins must be a list of bin edges in days, got {bins!r}")
        if bins[0] != 0 or any(b <= a for a, b in zip(bins, bins[1:])):
            raise ValueError(f"tte_time_bins={list(bins)}: edges must start at 0 and be strictly increasing (days)")
        for name in ("tte_rank", "tte_max_positions"):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("tte_prs_rank", self.tte_prs_rank, minimum=0)
        if not isinstance(self.tte_history_summary, bool):
            raise ValueError(f"tte_history_summary must be true or false, got {self.tte_history_summary!r}")
        w = self.tte_loss_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"tte_loss_weight must be a number >= 0, got {w!r}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


__all__ = ["EhrPrsConfig", "PRESETS", "PRS_FUSIONS", "DEFAULT_TTE_TIME_BINS"]
