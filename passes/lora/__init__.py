"""LoRA pass: add every adapter's low-rank update at each site (arXiv:2106.09685), in one of two forms. Which
adapter applies is the call's own data (passes.route): switching adapters and per-row choice never change the graph.

Plain form ("single": every row of the call uses one adapter, whose weights the call passes in). Sites that read the
same input (q, k, v; gate, up) share one down-projection GEMM over their stacked A's (passes.lora.ops):

    Before:  q = linear(x, Wq);  k = linear(x, Wk);  v = linear(x, Wv)
    After:   q = linear(x, Wq);  k = linear(x, Wk);  v = linear(x, Wv)
             q', k', v' = LoraGroup(x, [q, k, v], [A_q, A_k, A_v], [B_q, B_k, B_v], [s_q, s_k, s_v], [p_q, ...])
             (A_*, B_*, s_*, p_*: route inputs, the call's adapter's own Parameters, scales and dropout rates)

Gathered form ("mixed": each row has its own adapter; Punica/S-LoRA's gathered banks, arXiv:2310.18547,
arXiv:2311.03285):

    Before:  y = linear(x, W, b)                       (GPT-2 Conv1D: y = addmm(b, x, W), x: [N, in])
    After:   y = linear(x, W, b)
             rows = route input                                                           # (batch,) slot per row
             A = stack([0, pad(A_1), pad(A_2), ...])[rows]                                # (batch, R, in)
             B = stack([0, pad(B_1), pad(B_2), ...])[rows]                                # (batch, out, R)
             s = scales[rows]                                                             # (batch,)
             x3 = row_dropout(x.reshape(batch, -1, in), rows)
             y' = y.reshape(batch, -1, out).baddbmm_(bmm(x3, A^T) * s, B^T).reshape(y.shape)

In both forms the second product accumulates into the site's output in one GEMM (in place where no autograd
needs the output): no full-size delta is written, scaled and added. In the gathered form slot 0 is the base model
(zero weights, zero scale), an adapter that does not target a site has zeros there, and ranks are zero-padded to
the largest rank R; with a declared capacity (AdapterStore.capacity) the graph has every slot of it and reads slot
i's weights from store.lanes[i], allocated at the capacity's rank. The modules the subgraph calls belong to the
form's graph (peftc.methods.form_module); the store holds only weights.

One idea per file:

    spec.py      the LoRA dataclass and its adapter_config.json mapping
    inits.py     PEFT's data-free inits beyond True / False / "gaussian" (PiSSA, OLoRA, orthogonal)
    weights.py   LoraWeights: one adapter's tensors at one site
    values.py    which weights sit at a site, and the values a call routes to the graph's inputs
    ops.py       the grouped update the plain form calls (and its backward), the adapter's dropout
    variants.py  DoRA, lora_bias, PiSSA / OLoRA, orthogonal as data (VARIANTS): what each adds, serves, refuses
    dora.py      DoRA's norm and per-channel rescale
    plain.py     the plain form;  gathered.py  the gathered form;  branches.py  embeddings and convolutions
    params.py    stacked expert weights (target_parameters)
    method.py    the rewrite, fold, keys, counts and checks, and the register_method call
"""
from __future__ import annotations

from .spec import SPEC_FIELDS, LoRA, lora_from_config, lora_to_config
from .weights import LoraWeights, zero_weights
from .ops import LoraGroup, lora_update
from .dora import DoraScale, dora_norm
from .variants import VARIANTS, Variant
from .gathered import RowDropout, SiteBank
from .branches import LoraBranch, LoraBranchRows
from .params import ExpertLora, ExpertLoraWeights
from .method import (FORMS, build_lora, check_lora, insert_lora, lora_bias_delta, lora_delta, lora_keys,
                     lora_param_count)

__all__ = ["LoRA", "lora_from_config", "lora_to_config", "SPEC_FIELDS", "LoraWeights", "zero_weights", "LoraGroup",
           "lora_update", "DoraScale", "dora_norm", "VARIANTS", "Variant", "RowDropout", "SiteBank", "LoraBranch",
           "LoraBranchRows", "ExpertLora", "ExpertLoraWeights", "FORMS", "build_lora", "check_lora", "insert_lora",
           "lora_bias_delta", "lora_delta", "lora_keys", "lora_param_count"]
