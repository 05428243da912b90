"""``backward="block"`` at the mechanism level: branch discovery, input detaching, and what they do to a step.

Each recognised architecture is built without weights at a tiny size. A "block-mode step" here is what
the callback does on a DROP step: freeze the dropped branches' parameters (``ParameterFreezer``) and
detach their entries' inputs (``BranchInputDetacher``). The reference it is compared with is a deep copy
whose dropped entries have their ``forward`` replaced by hand with one that detaches the inputs; no LDB
code is involved in the reference.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Callable

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet, resnet18
from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

from lightning_ldb.branches import Branch, branch_from_names, discover_branches, select_branch_candidates
from lightning_ldb.dropping import BranchInputDetacher, ParameterFreezer
from lightning_ldb.layers import discover_layers

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

LossFn = Callable[[nn.Module], torch.Tensor]


def _images(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _tokens(vocab: int = 50, batch: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def _logits_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean()


def _hf_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    hidden = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return hidden.square().mean()


def _resnet_basic() -> nn.Module:
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)
    # The CIFAR stem the benchmarks use: 3x3 stride-1 conv, no max-pool.
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def _resnet_bottleneck() -> nn.Module:
    return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10, width_per_group=16)


def _vit() -> nn.Module:
    # init_values gives the blocks real LayerScale parameters (ls1/ls2), which belong to the branches.
    return timm.models.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10, init_values=0.5
    )


def _torchvision_vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    model = VisionTransformer(image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=10)
    nn.init.normal_(model.heads.head.weight)  # torchvision zero-initialises the head: no gradient would reach the blocks
    return model


def _swin(v2: bool) -> nn.Module:
    extra: dict[str, Any] = {"block": SwinTransformerBlockV2, "downsample_layer": PatchMergingV2} if v2 else {}
    return SwinTransformer(
        patch_size=[2, 2], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[2, 2], num_classes=10, **extra
    )


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=50,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(config, add_pooling_layer=False)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=50, max_position_embeddings=16, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


class KeywordResidual(nn.Module):
    """Calls its branch entry with a keyword argument, as Hugging Face blocks do."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.tanh(self.fc(input=x)))


def _keyword_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), KeywordResidual(), KeywordResidual(), KeywordResidual(), nn.Linear(4, 1))


# name -> (build, spec, loss, expected branch names)
CASES: dict[str, tuple[Callable[[], nn.Module], Any, LossFn, Sequence[str]]] = {
    "resnet-basic": (
        _resnet_basic, None, lambda m: _logits_loss(m, _images()),
        ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"],
    ),
    "resnet-bottleneck": (
        _resnet_bottleneck, None, lambda m: _logits_loss(m, _images(size=32)),
        ["layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1", "layer4.0.conv1"],
    ),
    "vit": (
        _vit, None, lambda m: _logits_loss(m, _images(size=32)),
        ["blocks.0.norm1", "blocks.0.norm2", "blocks.1.norm1", "blocks.1.norm2"],
    ),
    "torchvision-vit": (
        _torchvision_vit, None, lambda m: _logits_loss(m, _images(size=8)),
        [f"encoder.layers.encoder_layer_{i}.{ln}" for i in (0, 1) for ln in ("ln_1", "ln_2")],
    ),
    "swin-v1": (
        lambda: _swin(False), None, lambda m: _logits_loss(m, _images(size=8)),
        ["features.1.0.norm1", "features.1.0.norm2", "features.3.0.norm1", "features.3.0.norm2"],
    ),
    "swin-v2": (
        lambda: _swin(True), None, lambda m: _logits_loss(m, _images(size=8)),
        ["features.1.0.attn", "features.1.0.mlp", "features.3.0.attn", "features.3.0.mlp"],
    ),
    "gpt2": (
        _gpt2, None, lambda m: _hf_loss(m, _tokens()),
        ["transformer.h.0.ln_1", "transformer.h.0.ln_2", "transformer.h.1.ln_1", "transformer.h.1.ln_2"],
    ),
    "bert": (
        _bert, None, lambda m: _hf_loss(m, _tokens()),
        [
            "encoder.layer.0.attention.self", "encoder.layer.0.intermediate",
            "encoder.layer.1.attention.self", "encoder.layer.1.intermediate",
        ],
    ),
    "llama": (
        _llama, None, lambda m: _hf_loss(m, _tokens()),
        [
            "model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
            "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
        ],
    ),
    "keyword-spec": (
        _keyword_net, {"*.fc": ["out"]}, lambda m: m(torch.linspace(-1, 1, 12).reshape(3, 4)).square().mean(),
        ["1.fc", "2.fc", "3.fc"],
    ),
}


# name -> the modules of each branch of one block, relative to the block, in the order forward calls
# them (read from each block's forward source): the first is the entry, the last produces F(x).
FORWARD_MEMBERS: dict[str, Sequence[Sequence[str]]] = {
    "resnet-basic": [("conv1", "bn1", "conv2", "bn2")],
    "resnet-bottleneck": [("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")],
    "vit": [("norm1", "attn", "ls1", "drop_path1"), ("norm2", "mlp", "ls2", "drop_path2")],
    "torchvision-vit": [("ln_1", "self_attention", "dropout"), ("ln_2", "mlp")],
    "swin-v1": [("norm1", "attn"), ("norm2", "mlp")],
    "swin-v2": [("attn", "norm1"), ("mlp", "norm2")],
    "gpt2": [("ln_1", "attn"), ("ln_2", "mlp")],
    "bert": [("attention.self", "attention.output.dense"), ("intermediate", "output.dense")],
    "llama": [("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")],
    "keyword-spec": [("fc", "out")],
}


def _forward_members(case_name: str, branches: Sequence[Branch]) -> list[list[str]]:
    """The qualified names of each branch's modules in forward order, from :data:`FORWARD_MEMBERS`."""
    rules = FORWARD_MEMBERS[case_name]
    qualified = []
    for index, branch in enumerate(branches):
        relative = rules[index % len(rules)]
        block = branch.name[: len(branch.name) - len(relative[0])]
        qualified.append([block + member for member in relative])
    return qualified


def _detach_outputs_by_hand(reference: nn.Module, module_names: Sequence[str]) -> None:
    """Make each named module of ``reference`` return a detached output (tensors, or tuples of them)."""

    def detach_output(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in output)
        return output.detach()

    for name in module_names:
        reference.get_submodule(name).register_forward_hook(detach_output)


def _detach_by_hand(reference: nn.Module, entry_names: Sequence[str]) -> None:
    """Make each named entry of ``reference`` run on detached inputs, without LDB: replace its forward."""
    for name in entry_names:
        entry = reference.get_submodule(name)
        original = entry.forward

        def forward(*args: Any, _original: Callable = original, **kwargs: Any) -> Any:
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            return _original(*args, **kwargs)

        entry.forward = forward  # an instance attribute: nn.Module.__call__ uses it


def _loss(model: nn.Module, loss_fn: LossFn) -> torch.Tensor:
    torch.manual_seed(0)  # any dropout draws the same mask in every copy
    return loss_fn(model)


def _dropped(branches: Sequence[Branch]) -> list[Branch]:
    # The second and third branch: an attention and an MLP branch in the transformers, and in the
    # ResNets a block with a downsample skip.
    return [branches[1], branches[2]]


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, nn.Module, Any, LossFn, Sequence[str]]:
    build, spec, loss_fn, names = CASES[request.param]
    torch.manual_seed(0)
    return request.param, build(), spec, loss_fn, names


def test_discovery_names_the_branches_by_their_entry(case: Any) -> None:
    case_name, model, spec, _, names = case
    branches = discover_branches(model, spec)
    assert [b.name for b in branches] == list(names)
    for branch, members in zip(branches, _forward_members(case_name, branches)):
        assert branch.members[0] == branch.name and set(branch.members) == set(members)
        expected_params = {id(p) for m in members for p in model.get_submodule(m).parameters()}
        assert {id(p) for p in branch.parameters} == expected_params
        assert branch.entry is model.get_submodule(branch.name)
        assert len({id(p) for p in branch.parameters}) == len(branch.parameters) > 0
        assert branch.numel == sum(p.numel() for p in branch.parameters)


def test_block_step_keeps_the_forward_and_gives_the_gradients_of_the_detached_reference(case: Any) -> None:
    case_name, model, spec, loss_fn, _ = case
    plain, reference, full = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    output_detached = copy.deepcopy(model)
    branches = discover_branches(model, spec)
    dropped = _dropped(branches)
    dropped_ids = {id(p) for b in dropped for p in b.parameters}

    freezer, detacher = ParameterFreezer(), BranchInputDetacher()
    freezer.freeze(p for b in dropped for p in b.parameters)
    detacher.detach(dropped)
    loss = _loss(model, loss_fn)
    loss.backward()

    # torchvision's ViT feeds nn.MultiheadAttention a transposed (non-contiguous) input; when neither it nor the
    # frozen weights require a gradient, torch's matmul takes another kernel (bmm instead of a folded mm), which
    # rounds differently in the last bit. Weights mode freezing the same layer would do the same.
    same = torch.equal if case_name != "torchvision-vit" else _equal_to_rounding
    assert same(loss, _loss(plain, loss_fn)), "the forward value must be bit-for-bit the plain one"
    _detach_by_hand(reference, [b.name for b in dropped])
    _loss(reference, loss_fn).backward()
    _loss(full, loss_fn).backward()
    # The branch really is F in skip(x) + F(x): cutting its output instead of its input changes no
    # gradient outside it. A rule that put a module seeing the skip into the branch would fail here.
    forward_members = dict(zip((b.name for b in branches), _forward_members(case_name, branches)))
    _detach_outputs_by_hand(output_detached, [forward_members[b.name][-1] for b in dropped])
    _loss(output_detached, loss_fn).backward()

    reference_params = dict(reference.named_parameters())
    output_detached_params = dict(output_detached.named_parameters())
    full_params = dict(full.named_parameters())
    differs_from_exact = False
    for name, param in model.named_parameters():
        if id(param) in dropped_ids:
            assert param.grad is None, f"dropped branch parameter {name} got a gradient"
            continue
        expected = reference_params[name].grad
        assert (param.grad is None) == (expected is None), name
        # Nothing outside the dropped branches is cut off (the branch holds all that only feeds it).
        assert (param.grad is None) == (full_params[name].grad is None), f"{name} lost its gradient"
        assert (expected is None) or same(expected, output_detached_params[name].grad), name
        if expected is not None:
            assert same(param.grad, expected), f"{name}: gradient differs from the detached reference"
            differs_from_exact |= not torch.equal(param.grad, full_params[name].grad)
    # The approximation is real: some layer below a dropped branch loses the branch's share of its gradient.
    assert differs_from_exact


def _equal_to_rounding(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def _backward_flops(model: nn.Module, loss_fn: LossFn) -> int:
    loss = _loss(model, loss_fn)
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops()


def test_block_backward_costs_fewer_flops_than_weights_mode_with_the_same_drop(case: Any) -> None:
    _, model, spec, loss_fn, _ = case
    dropped = _dropped(discover_branches(model, spec))
    freezer = ParameterFreezer()
    freezer.freeze(p for b in dropped for p in b.parameters)
    weights_flops = _backward_flops(model, loss_fn)
    detacher = BranchInputDetacher()
    detacher.detach(dropped)
    block_flops = _backward_flops(model, loss_fn)
    assert 0 < block_flops < weights_flops


def test_restore_leaves_no_hook_and_the_model_trains_fully_again(case: Any) -> None:
    _, model, spec, loss_fn, _ = case
    branches = discover_branches(model, spec)
    hooks_before = {name: len(m._forward_pre_hooks) for name, m in model.named_modules()}
    flags_before = {name: p.requires_grad for name, p in model.named_parameters()}
    freezer, detacher = ParameterFreezer(), BranchInputDetacher()
    freezer.freeze(p for b in branches for p in b.parameters)
    assert detacher.detach(branches) == len(branches)
    assert detacher.detach(branches) == 0, "detaching again must not add a second hook"
    assert all(len(b.entry._forward_pre_hooks) == 1 for b in branches)
    detacher.restore()
    freezer.restore()
    detacher.restore()  # twice is harmless
    assert all(not b.entry._forward_pre_hooks for b in branches)
    assert {name: len(m._forward_pre_hooks) for name, m in model.named_modules()} == hooks_before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags_before
    _loss(model, loss_fn).backward()
    assert all(p.grad is not None for b in branches for p in b.parameters)


def test_resnet18_branches_and_candidates_keep_the_layers_weights_mode_keeps() -> None:
    model = resnet18(num_classes=10)
    branches = discover_branches(model)
    assert [b.name for b in branches] == [f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    downsample = {id(p) for p in model.layer2[0].downsample.parameters()}
    assert not downsample & {id(p) for b in branches for p in b.parameters}, "the downsample path is the skip"

    layers = discover_layers(model)
    # keep_first=4 keeps conv1, bn1, layer1.0.conv1, layer1.0.bn1: the branch holding the last two is kept.
    names = [b.name for b in select_branch_candidates(branches, layers, keep_first=4, keep_last=1)]
    assert names == [b.name for b in branches[1:]]
    # keep_last counts layers from the end: fc, layer4.1.bn2, layer4.1.conv2 -> layer4.1's branch is kept.
    names = [b.name for b in select_branch_candidates(branches, layers, keep_first=0, keep_last=3)]
    assert names == [b.name for b in branches[:-1]]
    names = [b.name for b in select_branch_candidates(branches, layers, 0, 0, include=["layer3.*"], exclude=["*.1.*"])]
    assert names == ["layer3.0.conv1"]


def test_a_block_whose_forward_is_overridden_is_not_recognised() -> None:
    class SameForward(BasicBlock):
        pass

    class OwnForward(BasicBlock):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn2(self.conv2(self.conv1(x)))  # no skip: not a residual branch

    assert [b.name for b in discover_branches(nn.Sequential(SameForward(8, 8)))] == ["0.conv1"]
    assert discover_branches(nn.Sequential(OwnForward(8, 8))) == []


def test_a_callable_spec_returns_exactly_its_branches() -> None:
    model = _keyword_net()
    branches = discover_branches(model, lambda m: [branch_from_names(m, "2.fc", ["2.out"])])
    assert [(b.name, b.members) for b in branches] == [("2.fc", ("2.fc", "2.out"))]


@pytest.mark.parametrize(
    ("spec", "error", "says"),
    [
        ({"*.nope": ["out"]}, ValueError, "matches no module"),
        ({"*.fc": ["missing"]}, ValueError, "has no module 'missing'"),
        ({"*.fc": "out"}, TypeError, "a list, even for one name"),
        ({"*.fc": [""]}, TypeError, "non-empty module names"),
        ({"": ["out"]}, TypeError, "non-empty fnmatch patterns"),
        ({"1.fc": ["out"], "1.out": ["fc"]}, ValueError, "share a parameter"),
        ({"1": ["1.1"]}, ValueError, "has no module"),
        ({"1.fc": ["out"], "[1].fc": ["out"]}, ValueError, "matched by both"),
        (["*.fc"], TypeError, "a mapping"),
        (lambda m: ["1.fc"], TypeError, "must return Branch objects"),
    ],
)
def test_bad_branches_specs_raise_naming_the_argument(spec: Any, error: type, says: str) -> None:
    with pytest.raises(error, match="`branches`") as raised:
        discover_branches(_keyword_net(), spec)
    assert says in str(raised.value)


def test_a_branch_without_parameters_is_refused() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(ValueError, match=r"`branches`.*'1'.*has no parameters"):
        discover_branches(model, {"1": []})


def test_the_hook_detaches_tensors_nested_in_any_argument_and_leaves_the_rest() -> None:
    seen: dict[str, Any] = {}

    class Entry(nn.Module):
        def forward(self, x: torch.Tensor, pair: tuple, options: dict, flag: bool = False) -> torch.Tensor:
            seen.update(x=x, pair=pair, options=options, flag=flag)
            return x

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.entry, self.fc = Entry(), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.fc(self.entry(x, (x, [x, 3]), options={"t": x, "n": None}, flag=True))

    model = nn.Sequential(Block())
    detacher = BranchInputDetacher()
    detacher.detach(discover_branches(model, {"0.entry": ["fc"]}))
    model(torch.ones(1, 2, requires_grad=True))
    tensors = [seen["x"], seen["pair"][0], seen["pair"][1][0], seen["options"]["t"]]
    assert all(not t.requires_grad for t in tensors)
    assert seen["pair"][1][1] == 3 and seen["options"]["n"] is None and seen["flag"] is True
    assert isinstance(seen["pair"], tuple) and isinstance(seen["pair"][1], list)
