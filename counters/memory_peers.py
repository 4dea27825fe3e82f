"""Other tools' memory figures for a Llama, recomputed here from their formulas (never copied), for the errata
in docs/memory.md. Each function names the repository, commit, file and lines it follows (read 2026-12-06);
their code is not reused, only the arithmetic, written out from scratch.

All results are bytes. ``config`` is a :class:`llama_ref.LlamaConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llama_ref.config import LlamaConfig
from llama_ref.shapes import param_count

ACCELERATE = ("huggingface/accelerate", "16cb6eb80dd9aa8b4df1a63ef57863e455d53b83", "2026-07-24")
DEEPSPEED = ("deepspeedai/DeepSpeed", "edaa7221267243c7be7fb49c5d5f5c4fb97b4641", "2026-08-22")
LLM_ANALYSIS = ("cli99/llm-analysis", "d841e40aec8c84b9e76ba9cfbce67418adb172bd", "2024-11-13")
LLM_VIEWER = ("hahnyuan/LLM-Viewer", "472f71f1a1807e80b573252e9185fd5e8d795e95", "2024-07-30")
#: The buffers transformers 5.x gives LlamaForCausalLM (``model.rotary_emb.inv_freq`` and ``original_inv_freq``,
#: head_dim/2 fp32 values each), which accelerate counts as model size.
HF_ROTARY_BUFFER_BYTES = lambda config: 2 * (config.head_dim // 2) * 4  # noqa: E731


@dataclass(frozen=True)
class PeerFigure:
    tool: str
    what: str
    total: int
    parts: dict = field(default_factory=dict)
    source: str = ""


def accelerate_estimate(config: LlamaConfig) -> dict:
    """``accelerate estimate-memory``: src/accelerate/commands/estimate.py L224-L256 (``estimate_training_usage``),
    L259-L291 (``gather_data``), L294-L308; src/accelerate/utils/modeling.py L1067-L1082. The model is built empty
    in fp32 (L130); its size is every parameter and buffer; the "float16" column halves it; "Training using Adam"
    is the *largest* of the model, gradients, optimizer and "step" entries (L301): 4x the fp32 size for float32,
    2x for float16/bfloat16 (mixed precision)."""
    fp32 = param_count(config) * 4 + HF_ROTARY_BUFFER_BYTES(config)
    src = f"{ACCELERATE[0]}@{ACCELERATE[1][:7]} src/accelerate/commands/estimate.py L224-L308"
    return {
        "inference_fp16": PeerFigure("accelerate", "Total Size, float16", fp32 // 2, {"fp32 size": fp32}, src),
        "training_fp32": PeerFigure("accelerate", "Training using Adam, float32", 4 * fp32, {"fp32 size": fp32}, src),
        "training_fp16": PeerFigure("accelerate", "Training using Adam, float16", 2 * fp32, {"fp32 size": fp32}, src),
    }


def deepspeed_zero(config: LlamaConfig) -> dict:
    """``estimate_zero2_model_states_mem_needs`` (deepspeed/runtime/zero/stage_1_and_2.py L3081-L3097) and
    ``estimate_zero3_model_states_mem_needs`` (deepspeed/runtime/zero/stage3.py L3744-L3780), one GPU, no offload:
    2 bytes of fp16 parameters plus 18 per parameter (fp16 gradient 2, fp32 gradient 4, fp32 master copy 4, Adam
    moments 8); ZeRO-3 adds 4 bytes per parameter of the largest module (the embedding or the head)."""
    p = param_count(config)
    largest = config.vocab_size * config.dim
    return {
        "zero2": PeerFigure("DeepSpeed", "ZeRO-2 model states, 1 GPU, no offload", 2 * p + 18 * p,
                            source=f"{DEEPSPEED[0]}@{DEEPSPEED[1][:7]} deepspeed/runtime/zero/stage_1_and_2.py "
                                   "L3081-L3097"),
        "zero3": PeerFigure("DeepSpeed", "ZeRO-3 model states, 1 GPU, no offload", 4 * largest + 18 * p,
                            source=f"{DEEPSPEED[0]}@{DEEPSPEED[1][:7]} deepspeed/runtime/zero/stage3.py L3744-L3780"),
    }


@dataclass(frozen=True)
class LlmAnalysisModel:
    """The model config llm-analysis uses: for Llama-2-7B its own llm_analysis/model_configs/
    NousResearch_Llama-2-7b-hf.json (ffn_embed_dim 16384, no gated units); for a Hub model, transformers' config
    with ``mlp_gated_linear_units`` set only when intermediate/hidden is exactly 3.5 (llm_analysis/config.py
    L218; otherwise that name is never assigned and building the config fails)."""

    h: int
    n: int
    kv: int
    ffn: int
    gated: bool
    vocab: int
    layers: int

    @classmethod
    def of(cls, config: LlamaConfig) -> "LlmAnalysisModel":
        if config.name == "llama-2-7b":
            return cls(h=4096, n=32, kv=32, ffn=16384, gated=False, vocab=32000, layers=32)
        if config.hidden_dim / config.dim != 3.5:
            raise ValueError(f"llm-analysis cannot build a config for {config.name} from its Hub config")
        return cls(h=config.dim, n=config.n_heads, kv=config.n_kv_heads, ffn=config.hidden_dim, gated=True,
                   vocab=config.vocab_size, layers=config.n_layers)

    def layer_params(self) -> int:  # analysis.py L266-L306
        attn = 2 * self.h ** 2 + 2 * self.h * (self.h * self.kv // self.n)
        return attn + (3 if self.gated else 2) * self.h * self.ffn + 2 * self.h

    def weights(self, w: int = 2) -> int:
        # analysis.py L249-L264: the embedding counted once (shared_embedding=True), the untied head not at all
        return (self.layers * self.layer_params() + self.vocab * self.h + self.h) * w


def llm_analysis_inference(config: LlamaConfig, *, batch: int = 1, seq_len: int = 4096, generate: int = 1) -> PeerFigure:
    """``LLMAnalysis.inference`` (llm_analysis/analysis.py L1546-L1760), defaults w16a16e16, flash attention, fp16
    layer norms: the weights, and the larger of the prefill's activations (the largest of one layer's attention, MLP
    or norm activations, or the logits, L1653) and the KV cache of seq_len + generate positions plus a decode
    step's activations (L1691-L1730), which is what it checks against the GPU's memory."""
    m, a = LlmAnalysisModel.of(config), 2
    s, b, h = seq_len, batch, m.h

    def layer(tokens):  # analysis.py L553-L884, inference branch
        attn = max(3 * a * tokens * b * h, (2 * tokens * b * h + 4 * m.n * tokens * b) * a)
        mlp = max(a, a * m.ffn / h) * tokens * b * h
        norm = tokens * b * h * 2
        return max(attn, mlp, norm)
    prefill = max(layer(s), m.vocab * b * s * a)
    kv = 2 * b * (s + generate) * (h // m.n) * m.kv * a * m.layers  # L886-L915
    decode = max(layer(1), m.vocab * b * a)
    weights = m.weights()
    total = weights + max(prefill, kv + decode)
    return PeerFigure("llm-analysis", f"inference, seq_len {s}, {generate} generated", int(total),
                      {"weights": weights, "prefill activations": int(prefill), "kv cache": kv,
                       "decode activations": int(decode)},
                      f"{LLM_ANALYSIS[0]}@{LLM_ANALYSIS[1][:7]} llm_analysis/analysis.py L1546-L1760")


def llm_analysis_training(config: LlamaConfig, *, batch: int = 1, seq_len: int = 4096) -> PeerFigure:
    """``LLMAnalysis.training`` (llm_analysis/analysis.py L1962-L2230), defaults: w16a16e16, fp32 master weights
    and Adam (12 bytes a parameter of optimizer state), fp32 layer norms, flash attention, an attention dropout
    mask (``attn_dropout=True`` by default, L560), no recompute: the weights, the optimizer state, the activations
    (Korthikanti et al.'s per-layer terms, times the layers, plus the input and output embeddings and the final
    norm) and the larger of the prefetch buffers and the loss's backward (L2214); the fp32 gradients are checked
    separately and not added."""
    m, a = LlmAnalysisModel.of(config), 2
    s, b, h = seq_len, batch, m.h
    n_params = m.layers * m.layer_params() + m.vocab * h + h
    weights = m.weights()
    optimizer = 12 * n_params
    attn = (s * b * h + 4 * s * b * h) * a + (2 * s * b * h + 4 * m.n * s * b) * a + s * b * h
    mlp = s * b * h * a + (a + a) * (m.ffn / h) * s * b * h
    norms = 2 * s * b * h * 4
    activations = m.layers * (attn + mlp + norms) + h * b * s * a + m.vocab * b * s * a + s * b * h * 4
    layer_weights = m.layer_params() * 2
    prefetch = max(m.vocab * h * 2 + layer_weights, 2 * layer_weights)
    loss_bwd = m.vocab * b * s * a
    total = weights + optimizer + activations + max(prefetch, loss_bwd)
    return PeerFigure("llm-analysis", f"training, seq_len {s}", int(total),
                      {"weights": weights, "optimizer": optimizer, "activations": int(activations),
                       "gradients (not added)": 4 * n_params, "max(prefetch, loss backward)": max(prefetch, loss_bwd)},
                      f"{LLM_ANALYSIS[0]}@{LLM_ANALYSIS[1][:7]} llm_analysis/analysis.py L1962-L2230")


def llm_viewer_prefill(config: LlamaConfig, *, batch: int = 1, seq_len: int = 4096) -> PeerFigure:
    """``ModelAnalyzer.analyze`` (model_analyzer.py L118-L455, configs/Llama.py), w16a16, no flash attention: the
    prefill's "memory_consumption" (L427-L441) is the decoder layers' linear weights, the KV cache (the k/v
    projections' outputs) and the outputs of one layer's ops all alive at once; computed before the head is added
    (L444), so neither the embedding nor the head is in it, and the SwiGLU product is counted hidden_size wide."""
    h, n, kv, f, L = config.dim, config.n_heads, config.n_kv_heads, config.hidden_dim, config.n_layers
    s, b, a = seq_len, batch, 2
    kv_width = h * kv // n
    weights = L * (2 * h * h + 2 * h * kv_width + 3 * h * f) * a
    kv_cache = L * 2 * kv_width * b * s * a
    tmp = 9 * h * b * s * a + 2 * f * b * s * a + 2 * s * s * b * n * a
    return PeerFigure("LLM-Viewer", f"prefill, seq_len {s}", weights + kv_cache + tmp,
                      {"weights (layers only)": weights, "kv cache": kv_cache, "one layer's outputs": tmp},
                      f"{LLM_VIEWER[0]}@{LLM_VIEWER[1][:7]} model_analyzer.py L118-L455, configs/Llama.py")


__all__ = ["PeerFigure", "accelerate_estimate", "deepspeed_zero", "llm_analysis_inference", "llm_analysis_training",
           "llm_viewer_prefill"]
