"""How much memory one training worker of a candidate needs, from its config alone (shapes on the
meta device: no weights are read).

The estimate is what a trial asks Ray for (`memory`), so trials are packed by memory as well as CPUs,
and what `damoc plan` shows per trial. Its terms, in bytes:
- the process: Python with torch, transformers, peft, DeepSpeed and Ray imported (measured: ~0.5 GiB);
- weights: forward parameters x the training dtype's width;
- trainable state: gradients, a master copy and AdamW's two moments, 16 bytes per trainable parameter
  (LoRA: r x (in + out) per targeted linear layer; full: every parameter);
- activations of one micro-batch kept for the backward pass: per token and layer 24 x hidden +
  6 x intermediate values (norms in fp32, rotary copies, LoRA's dropped-out inputs; measured on
  SmolLM2-135M with LoRA on its 7 projections: 22.7k values for 24 x 576 + 6 x 1536 = 23.0k), plus the
  attention scores (heads x length);
- logits: the loss computes them at the answer positions only, a chunk at a time
  (damoc/lm/nll.py::CHUNK_FLOATS), so at most one chunk is alive (x3: logits, fp32 copy, softmax).
On a GPU the weights, state, activations and logits live on the device; the host holds the process
and one copy of the weights while they load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GIB = 1024 ** 3
PROCESS_BYTES = int(0.6 * GIB)
ADAM_BYTES_PER_TRAINABLE = 16
ANSWER_SHARE = 0.5  # of a micro-batch's positions scored, for the logits term (answers and EOS)
ACT_PER_HIDDEN, ACT_PER_INTERMEDIATE = 24, 6  # activation values kept per token and layer (see above)


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model: parameters, LoRA's trainable parameters, widths, vocabulary."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    lora_params: dict[int, int]  # trainable parameters per LoRA rank 1 (multiply by r): {1: n}

    def trainable(self, method: str, r: int) -> int:
        return self.params if method == "full" else r * self.lora_params.get(1, 0)


def _first(config, *keys: str, default: int = 0) -> int:
    for k in keys:
        v = getattr(config, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def shape_of(model, targets) -> Shape:
    """The shape of a model (built on the meta device, or real); `targets` as LoRA takes them."""
    from damoc.lm.arch import ADAPTERS

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    layers = adapter.layer_list(model) if adapter else None
    per_rank = 0
    for name, module in (layers.named_modules() if layers is not None else []):
        weight = getattr(module, "weight", None)
        leaf = name.rsplit(".", 1)[-1]
        linear = type(module).__name__ in ("Linear", "Conv1D") and weight is not None and weight.dim() == 2
        if linear and (targets == "all-linear" or leaf in targets):
            per_rank += int(sum(weight.shape))  # r x (in + out) per adapted matrix
    head = model.get_output_embeddings()
    return Shape(params=sum(p.numel() for p in model.parameters()),
                 layers=len(layers) if layers is not None else _first(config, "num_hidden_layers", "n_layer"),
                 hidden=hidden, intermediate=_first(config, "intermediate_size", "n_inner", "ffn_dim",
                                                    default=4 * hidden),
                 heads=_first(config, "num_attention_heads", "n_head", default=1),
                 vocab=int(head.weight.shape[0]) if head is not None else _first(config, "vocab_size"),
                 lora_params={1: per_rank})


def meta_model(path_or_id: str, trust_remote_code: bool = False, revision: str | None = None,
               offline: bool = False):
    """(config, model) from a config alone: the model is built on the meta device, so no memory and no
    weights are touched. Offline, only a cached config is read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from damoc.lm.load import hf_token

    config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, revision=revision,
                                        token=hf_token(), local_files_only=offline)
    with torch.device("meta"):
        return config, AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def meta_shape(path_or_id: str, targets, trust_remote_code: bool = False) -> Shape:
    """A candidate's shape from its config alone."""
    config, model = meta_model(path_or_id, trust_remote_code)
    return shape_of(model, resolve_targets(config, targets))


def resolve_targets(config, targets):
    """LoRA's target modules as the finetune stage resolves them ('auto': the family's projections)."""
    if targets != "auto":
        return targets if targets == "all-linear" else tuple(targets)
    from damoc.lm.arch import ADAPTERS

    adapter = ADAPTERS.get(getattr(config, "model_type", None))
    return adapter.lora_targets if adapter else "all-linear"


@dataclass(frozen=True)
class TrialMemory:
    """One training worker's memory, by term (bytes); `host` is what the worker asks Ray for."""

    process: int
    weights: int
    trainable_state: int
    activations: int
    logits: int
    device: int  # on the accelerator (0 on CPU)
    host: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def trial_memory(shape: Shape, *, method: str, lora_r: int, micro_batch: int, length: int, gpu: bool,
                 weight_bytes: int = 4, chunk_floats: int | None = None) -> TrialMemory:
    """The estimate for one worker training `shape` on micro-batches of `micro_batch` x `length` tokens."""
    from damoc.lm.nll import CHUNK_FLOATS

    chunk_floats = chunk_floats or CHUNK_FLOATS
    weights = shape.params * weight_bytes
    state = ADAM_BYTES_PER_TRAINABLE * shape.trainable(method, lora_r)
    tokens = micro_batch * length
    per_token_layer = (ACT_PER_HIDDEN * shape.hidden + ACT_PER_INTERMEDIATE * shape.intermediate
                       + shape.heads * length)
    activations = tokens * shape.layers * per_token_layer * weight_bytes
    scored = min(int(tokens * ANSWER_SHARE), max(1, chunk_floats // max(1, shape.vocab)))
    logits = 3 * 4 * scored * shape.vocab
    on_device = weights + state + activations + logits
    if gpu:
        return TrialMemory(PROCESS_BYTES, weights, state, activations, logits, on_device, PROCESS_BYTES + weights)
    return TrialMemory(PROCESS_BYTES, weights, state, activations, logits, 0, PROCESS_BYTES + on_device)


def finetune_memory(shape: Shape, ft, length: int) -> TrialMemory:
    """trial_memory for the job's finetune section (LoRA rank, micro-batch, device, precision)."""
    return trial_memory(shape, method=ft.method, lora_r=ft.lora.r, micro_batch=ft.batch_size, length=length,
                        gpu=ft.use_gpu, weight_bytes=2 if ft.use_gpu and ft.precision != "fp32" else 4)


def length_bound(rows, max_length: int) -> int:
    """An upper bound on training sequences' length in tokens without a tokenizer: the longest row's
    characters (instruction, input and output) / 2, as tokenizers average 3-4 characters a token on prose
    and code, plus 64 for a prompt template; never more than max_length. It sizes the activations."""
    longest = max((sum(len(str(r.get(k) or "")) for k in ("instruction", "input", "output")) for r in rows),
                  default=0)
    return min(max_length, longest // 2 + 64)


def gib(n: float) -> str:
    return f"{n / GIB:.1f} GiB"
