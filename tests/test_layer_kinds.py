"""LoRA on every layer kind of passes.match.KINDS beyond linear: nn.Embedding and nn.Conv1d/2d/3d (with groups), in
parity with HF PEFT both ways, merged, in mixed batches and in training; on small custom modules and on the embeddings
and patch convolution of real architectures.

PEFT's forms (peft/tuners/lora/layer.py): Embedding: y + s (embedding(ids, A^T) @ B^T), A [r, num] zeros and B
[dim, r] ~ N(0, 1) at first (init False: both ~ N(0, 1)), no dropout, keys lora_embedding_A / lora_embedding_B.
_ConvNd: y + s lora_B(lora_A(dropout(x))), lora_A a conv (in -> r, the base kernel, stride and padding), lora_B a
1x1 conv (r -> out, the base groups); r % groups == 0; merging a grouped conv is refused. PEFT also saves a targeted
embedding's own weight (base_layer.weight), which peftc checks equals the model's.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from peft import LoraConfig, PeftModel, get_peft_model

import peftc
from tests.models import make
from tests.parity import MOVED, TOL, assert_loads_and_merges, assert_parity, assert_same_weights, parity_inputs

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

tol = TOL[peftc.LoRA]
TARGETS = ["emb", "c1", "c2", "c3", "g"]


class Kinds(nn.Module):
    """One layer of each kind: an embedding with a padding index, Conv1d, a strided Conv2d, Conv3d, grouped Conv2d."""

    def __init__(self, groups: int = 2):
        super().__init__()
        self.emb = nn.Embedding(20, 4, padding_idx=0)
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.c3 = nn.Conv3d(4, 6, (1, 2, 2), bias=False)
        self.g = nn.Conv2d(8, 8, 3, padding=1, groups=groups)

    def forward(self, ids, img, vol, seq):
        e = self.emb(ids).sum((1, 2))                                        # (B,)
        return e + self.c1(seq).mean((1, 2)) + self.g(self.c2(img)).mean((1, 2, 3)) + self.c3(vol).mean((1, 2, 3, 4))


def kinds_inputs(batch: int = 3, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (batch, 5), generator=g)
    ids[0, 0] = 0                                                            # the padding index
    return (ids, torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 3, 4, 4, generator=g),
            torch.randn(batch, 4, 7, generator=g))


def model(groups: int = 2) -> Kinds:
    torch.manual_seed(0)
    return Kinds(groups).eval()


def peft_kinds(groups: int, **opts):
    ref = get_peft_model(model(groups), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **opts))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ref.eval()


def out_diff(a, b, x) -> float:
    with torch.no_grad():
        return (a(*x) - b(*x)).abs().max().item()


@pytest.mark.parametrize("groups", [1, 2])
def test_peft_adapter_on_every_kind_loads_and_back(groups, tmp_path):
    ref = peft_kinds(groups)
    ref.save_pretrained(tmp_path / "peft")
    ours = peftc.load_adapter(model(groups), tmp_path / "peft", example_inputs=kinds_inputs(2))
    assert {ours.sites[p].kind for p in ours.store["default"].targets} == {"embedding", "conv"}
    assert_same_weights(ours, ref)
    x = kinds_inputs(3, 1)
    assert out_diff(ours, model(groups), x) > MOVED * tol
    assert out_diff(ours, ref, x) <= tol
    ours.save_adapter(tmp_path / "ours")
    torch.manual_seed(0)
    again = PeftModel.from_pretrained(Kinds(groups).eval(), tmp_path / "ours").eval()
    assert out_diff(ours, again, x) <= tol


def test_merge_folds_embeddings_and_convolutions_and_refuses_a_grouped_one(tmp_path):
    ref = peft_kinds(1)
    ref.save_pretrained(tmp_path)
    ours = peftc.load_adapter(model(1), tmp_path, example_inputs=kinds_inputs(2))
    merged = ours.merge()
    x = kinds_inputs(3, 1)
    assert out_diff(merged, ref, x) <= tol
    assert not any("lora" in str(n.target) for n in merged.graph_module.graph.nodes)
    grouped = peftc.compile(model(2), peftc.LoRA(r=4, targets=["g"]), example_inputs=kinds_inputs(2))
    with pytest.raises(peftc.MergeError, match=r"g is a convolution with groups=2"):
        grouped.merge()


def test_mixed_batch_rows_equal_each_adapter_alone():
    pm = peftc.compile(model(2), peftc.LoRA(r=4, targets=TARGETS, init=False), example_inputs=kinds_inputs(2))
    pm.add_adapter("two", peftc.LoRA(r=2, targets=["emb", "c2"], init=False))
    x = kinds_inputs(3, 2)
    with torch.no_grad():
        mixed = pm(*x, adapter_names=["default", "two", "__base__"])
        alone = {}
        for name in ("default", "two"):
            pm.set_adapter(name)
            alone[name] = pm(*x)
        base = model(2)(*x)
    torch.testing.assert_close(mixed, torch.stack([alone["default"][0], alone["two"][1], base[2]]), rtol=0, atol=1e-5)


def test_training_reaches_every_kind_and_only_the_adapter():
    net = model(2)
    pm = peftc.compile(net, peftc.LoRA(r=4, targets=TARGETS, dropout=0.1), example_inputs=kinds_inputs(2)).train()
    pm(*kinds_inputs(4, 3)).square().mean().backward()
    grads = {n: p.grad for n, p in pm.named_trainable_parameters()}
    assert len(grads) == 2 * len(TARGETS) and all(g is not None for g in grads.values())
    assert all(p.grad is None for p in net.parameters())
    emb_A = pm.store["default"].sites["emb"].A.grad
    assert emb_A[:, 0].abs().max() == 0, "the padding index got a gradient (PEFT's embedding keeps it at zero)"


DORA_TARGETS = ["emb", "c1", "c2", "c3"]


def peft_dora_kinds(seed: int = 3):
    ref = get_peft_model(model(1), LoraConfig(r=4, lora_alpha=8, target_modules=DORA_TARGETS, use_dora=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_magnitude" in n:
                p.mul_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ref.eval()


def test_dora_on_embeddings_and_convolutions_equals_peft_both_ways(tmp_path):
    """PEFT's DoRA on an embedding (magnitude per embedding dim, norm over the vocabulary) and on Conv1d/2d/3d
    (magnitude [1, out, 1, ...]): loads with its weights and outputs, merges, and goes back to PEFT."""
    ref = peft_dora_kinds()
    ref.save_pretrained(tmp_path / "peft")
    ours = peftc.load_adapter(model(1), tmp_path / "peft", example_inputs=kinds_inputs(2))
    assert_same_weights(ours, ref)
    assert tuple(ours.store["default"].sites["c2"].magnitude.shape) == (1, 8, 1, 1)
    x = kinds_inputs(3, 1)
    assert out_diff(ours, model(1), x) > MOVED * tol
    assert out_diff(ours, ref, x) <= tol
    assert out_diff(ours.merge(), ref, x) <= tol
    ours.save_adapter(tmp_path / "ours")
    torch.manual_seed(0)
    again = PeftModel.from_pretrained(Kinds(1).eval(), tmp_path / "ours").eval()
    assert out_diff(ours, again, x) <= tol


def test_dora_gradients_on_embeddings_and_convolutions_equal_peft(tmp_path):
    peft_dora_kinds().save_pretrained(tmp_path)
    ours = peftc.load_adapter(model(1), tmp_path, is_trainable=True, example_inputs=kinds_inputs(2)).train()
    torch.manual_seed(0)
    ref = PeftModel.from_pretrained(Kinds(1), tmp_path, is_trainable=True).train()
    x = kinds_inputs(3, 4)
    ours(*x).square().sum().backward()
    ref(*x).square().sum().backward()
    theirs = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    for k, p in ours.store.peft_parameters("default"):
        name = k.replace("lora_embedding_A", "lora_embedding_A.default").replace(
            "lora_embedding_B", "lora_embedding_B.default").replace(".lora_A.", ".lora_A.default.").replace(
            ".lora_B.", ".lora_B.default.").replace("lora_magnitude_vector", "lora_magnitude_vector.default.weight")
        torch.testing.assert_close(p.grad, theirs[name].grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_fresh_dora_on_every_kind_is_the_identity():
    x = kinds_inputs(3, 5)
    pm = peftc.compile(model(1), peftc.LoRA(r=4, targets=DORA_TARGETS, use_dora=True), example_inputs=kinds_inputs(2))
    assert out_diff(pm, model(1), x) == 0


def test_options_an_embedding_or_convolution_cannot_take_are_refused():
    x = kinds_inputs(2)
    with pytest.raises(peftc.SpecError, match=r"lora_bias on emb"):
        peftc.compile(model(), peftc.LoRA(r=4, targets=["emb"], lora_bias=True), example_inputs=x)
    with pytest.raises(peftc.SpecError, match=r"init='pissa' on c2 \(a convolution"):
        peftc.compile(model(), peftc.LoRA(r=4, targets=["c2"], init="pissa"), example_inputs=x)
    with pytest.raises(peftc.SpecError, match=r"r=3 at g, a convolution with groups=2"):
        peftc.compile(model(), peftc.LoRA(r=3, targets=["g"]), example_inputs=x)
    with pytest.raises(ValueError, match="rank is divisible by groups"):                  # PEFT refuses it too
        get_peft_model(model(), LoraConfig(r=3, target_modules=["g"]))


def test_lora_bias_on_a_convolution_equals_peft(tmp_path):
    ref = get_peft_model(model(1), LoraConfig(r=4, lora_alpha=8, target_modules=["c1", "c2"], lora_bias=True))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.3)
    ref.eval().save_pretrained(tmp_path)
    ours = peftc.load_adapter(model(1), tmp_path, example_inputs=kinds_inputs(2))
    assert_same_weights(ours, ref)
    x = kinds_inputs(3, 1)
    assert out_diff(ours, ref, x) <= tol
    assert out_diff(ours.merge(), ref, x) <= tol


ARCH_TARGETS = {"llama": ["embed_tokens", "q_proj"], "gpt2": ["wte", "wpe", "c_attn"],
                "bert": ["word_embeddings", "token_type_embeddings", "query"], "vit": ["projection", "q_proj"]}
ARCH_CASES = [(a, False) for a in ARCH_TARGETS] + [("llama", True), ("vit", True)]


@pytest.mark.parametrize("arch,dora", ARCH_CASES, ids=[f"{a}{'-dora' if d else ''}" for a, d in ARCH_CASES])
def test_embeddings_and_patch_convolution_of_real_architectures(arch, dora, tmp_path):
    """PEFT's adapter (LoRA, or DoRA) on the token / position embeddings (GPT-2's wte is tied to lm_head) or ViT's
    patch convolution loads with PEFT's outputs, merges, and goes back to PEFT."""
    ref = get_peft_model(make(arch), LoraConfig(r=4, lora_alpha=8, target_modules=ARCH_TARGETS[arch],
                                                init_lora_weights=False, use_dora=dora)).eval()
    ref.save_pretrained(tmp_path / "peft")
    ours = assert_loads_and_merges(ref, tmp_path / "peft", arch)
    xs = parity_inputs(arch)
    ours.save_adapter(tmp_path / "ours")
    again = PeftModel.from_pretrained(make(arch), tmp_path / "ours").eval()
    for x in xs:
        assert_parity(ours, again, x, tol)


def test_a_changed_embedding_copy_in_the_checkpoint_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    get_peft_model(make("llama"), LoraConfig(r=4, target_modules=["embed_tokens"])).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    t = load_file(path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    assert key in t                                                          # PEFT's save_embedding_layers="auto"
    t[key] = t[key] + 1
    save_file(t, path)
    with pytest.raises(peftc.CheckpointError, match="differs from this model's"):
        peftc.load_adapter(make("llama"), tmp_path)


def test_all_linear_leaves_embeddings_and_convolutions_out():
    pm = peftc.compile(make("vit"), peftc.LoRA(r=4, targets="all-linear"))
    kinds = {pm.sites[p].kind for p in pm.store["default"].targets}
    assert kinds == {"linear"} and "vit.embeddings.patch_embeddings.projection" in pm.sites
