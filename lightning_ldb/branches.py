"""Residual branches: the unit ``backward="block"`` drops.

A residual block computes ``y = skip(x) + F(x)``. A *branch* is ``F``: the modules that see ``x`` only
through its *entry* module, and whose output reaches ``y`` only through the sum. If the branch is
computed on ``x.detach()`` (see :class:`~lightning_ldb.dropping.BranchInputDetacher`) and its parameters are frozen, the
forward value is unchanged and the backward pass does not enter ``F`` at all; the gradient still
reaches every earlier layer through ``skip``.

Branches are found by built-in rules for known blocks (each checked against the block's real
``forward``), or named by the user with ``branches=`` (see :func:`discover_branches`). A rule matches
the class that defines the block's ``forward``, by name and defining module (so a subclass that keeps
``forward`` matches, one that overrides it does not, and a copy of the class elsewhere, such as Hugging
Face remote code, does not), and only if the block has every module the rule names: a block that lacks
one (a Mixtral layer whose MoE is ``block_sparse_moe``, not ``mlp``) is not recognised rather than cut into
half a branch (:func:`unrecognised_blocks` lists such near misses). ``transformers``, ``timm`` and
``torchvision`` are never imported here.

This module is LDB's pure core: torch and the standard library only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Union

from torch import nn

from lightning_ldb.layers import Layer, _matches, split_kept


@dataclass(frozen=True)
class Branch:
    """One residual branch: what ``backward="block"`` drops as a unit.

    It has the same ``name``/``parameters``/``numel`` as :class:`~lightning_ldb.layers.Layer`, so
    :func:`~lightning_ldb.schedule.draw_dropped` and :class:`~lightning_ldb.dropping.ParameterFreezer`
    take branches unchanged.

    Attributes:
        name: The qualified name of the entry module (e.g. ``"layer2.1.conv1"``).
        entry: The module through which the block input enters the branch; its inputs are detached.
        parameters: Every parameter of the branch, each once, in ``named_modules()`` order.
        members: The qualified names of the branch's modules, the entry first.
    """

    name: str
    entry: nn.Module
    parameters: tuple[nn.Parameter, ...]
    members: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.parameters)


@dataclass(frozen=True)
class _Rule:
    """A built-in rule: blocks whose ``forward`` is defined by one of ``classes`` hold these branches.

    ``classes`` are ``(defining module, class name)`` pairs; ``branches`` are ``(entry, members)`` with
    names relative to the block, the entry first among the members; a block must have every one of them.
    """

    classes: tuple[tuple[str, str], ...]
    branches: tuple[tuple[str, ...], ...]


def _hf(*classes: tuple[str, str]) -> tuple[tuple[str, str], ...]:
    # ``(model type, class)``: defined in ``transformers.models.<type>.modeling_<type>``. A remote-code copy of
    # a class (``trust_remote_code``) may differ from the transformers one in anything, so it is not matched:
    # its user names its branches with ``branches=``.
    return tuple((f"transformers.models.{kind}.modeling_{kind}", name) for kind, name in classes)


# Each rule below was checked against the installed source of its block's ``forward``:
# torchvision 0.x resnet.py / swin_transformer.py, timm vision_transformer.py, transformers 5.x.
_RULES: tuple[_Rule, ...] = (
    # out = bn2(conv2(relu(bn1(conv1(x))))); out += downsample(x) or x: downsample is the skip.
    _Rule((("torchvision.models.resnet", "BasicBlock"),), (("conv1", "bn1", "conv2", "bn2"),)),
    _Rule(
        (("torchvision.models.resnet", "Bottleneck"),),
        (("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"),),
    ),
    # x = x + drop_path1(ls1(attn(norm1(x)))); x = x + drop_path2(ls2(mlp(norm2(x)))).
    _Rule(
        (("timm.models.vision_transformer", "Block"),),
        (("norm1", "attn", "ls1", "drop_path1"), ("norm2", "mlp", "ls2", "drop_path2")),
    ),
    # Post-norm: x = x + drop_path1(norm1(attn(x))): attn is the first module to see x.
    _Rule(
        (("timm.models.vision_transformer", "ResPostBlock"),),
        (("attn", "norm1", "drop_path1"), ("mlp", "norm2", "drop_path2")),
    ),
    # x = dropout(self_attention(ln_1(input))) + input; y = x + mlp(ln_2(x)).
    _Rule(
        (("torchvision.models.vision_transformer", "EncoderBlock"),),
        (("ln_1", "self_attention", "dropout"), ("ln_2", "mlp")),
    ),
    # V1: x = x + stochastic_depth(attn(norm1(x))); x = x + stochastic_depth(mlp(norm2(x))).
    _Rule(
        (("torchvision.models.swin_transformer", "SwinTransformerBlock"),),
        (("norm1", "attn"), ("norm2", "mlp")),
    ),
    # V2 (its own forward): x = x + stochastic_depth(norm1(attn(x))): the norm is inside, after attn.
    _Rule(
        (("torchvision.models.swin_transformer", "SwinTransformerBlockV2"),),
        (("attn", "norm1"), ("mlp", "norm2")),
    ),
    # h = attn(ln_1(x)) + x; h = mlp(ln_2(h)) + h. The optional cross-attention branch is left out:
    # it also reads encoder_hidden_states, which its entry does not see, so detaching would not prune it.
    _Rule(_hf(("gpt2", "GPT2Block")), (("ln_1", "attn"), ("ln_2", "mlp"))),
    # Post-norm: a = LayerNorm(dense(self(x)) + x); y = LayerNorm(dense(intermediate(a)) + a). The
    # LayerNorms see the sum, so they are not in the branch.
    _Rule(
        _hf(("bert", "BertLayer"), ("roberta", "RobertaLayer"), ("xlm_roberta", "XLMRobertaLayer")),
        (("attention.self", "attention.output.dense"), ("intermediate", "output.dense")),
    ),
    # h = x + self_attn(input_layernorm(x)); y = h + mlp(post_attention_layernorm(h)) (transformers 5.x: the MoE
    # of Mixtral and Qwen2-MoE is ``mlp`` too; 4.x's ``block_sparse_moe`` is not matched). Only classes whose
    # forward is exactly Llama's are listed: look-alikes such as Gemma2/3 or Chameleon's Swin layer put
    # the norms elsewhere, and a wrong rule would silently change the gradients.
    _Rule(
        _hf(
            ("llama", "LlamaDecoderLayer"),
            ("mistral", "MistralDecoderLayer"),
            ("mixtral", "MixtralDecoderLayer"),
            ("qwen2", "Qwen2DecoderLayer"),
            ("qwen2_moe", "Qwen2MoeDecoderLayer"),
            ("qwen3", "Qwen3DecoderLayer"),
            ("gemma", "GemmaDecoderLayer"),
            ("olmo", "OlmoDecoderLayer"),
            ("phi3", "Phi3DecoderLayer"),
        ),
        (("input_layernorm", "self_attn"), ("post_attention_layernorm", "mlp")),
    ),
)

#: What ``branches=`` accepts.
BranchesSpec = Union[None, Mapping[str, Sequence[str]], Callable[[nn.Module], Iterable[Branch]]]  # noqa: UP007  # a runtime alias


def _forward_owner(module: nn.Module) -> type | None:
    """The class in ``type(module)``'s MRO that defines ``forward``."""
    for cls in type(module).__mro__:
        if "forward" in vars(cls):
            return cls
    return None


def _rule_for(module: nn.Module) -> _Rule | None:
    """The rule of the class defining ``module``'s ``forward`` (matched by name and module), if any."""
    owner = _forward_owner(module)
    if owner is None:
        return None
    for rule in _RULES:
        if (owner.__module__, owner.__name__) in rule.classes:
            return rule
    return None


def _missing_members(module: nn.Module, rule: _Rule) -> list[str]:
    return [name for branch in rule.branches for name in branch if _submodule(module, name) is None]


def _matched_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, _Rule]]:
    """The blocks the built-in rules recognise, outermost only: their own descendants are not searched again."""
    inside: str | None = None
    for name, module in model.named_modules():
        if inside is not None and (name == inside or name.startswith(inside + ".") or inside == ""):
            continue
        inside = None
        rule = _rule_for(module)
        if rule is None or _missing_members(module, rule):
            continue
        yield name, module, rule
        inside = name


def _submodule(root: nn.Module, relative: str) -> nn.Module | None:
    try:
        return root.get_submodule(relative)
    except AttributeError:
        return None


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _make_branch(
    model: nn.Module, entry_name: str, member_names: Sequence[str], positions: Mapping[str, int]
) -> Branch:
    """A branch from qualified module names (the entry first); parameters in ``named_modules()`` order."""
    members = sorted(dict.fromkeys(member_names), key=lambda name: positions[name])
    seen: set[int] = set()
    params = []
    for member in members:
        for param in model.get_submodule(member).parameters():
            if id(param) not in seen:
                seen.add(id(param))
                params.append(param)
    members.remove(entry_name)
    return Branch(entry_name, model.get_submodule(entry_name), tuple(params), (entry_name, *members))


def _builtin_branches(model: nn.Module, positions: Mapping[str, int]) -> list[Branch]:
    found = []
    for name, _module, rule in _matched_blocks(model):
        for relative in rule.branches:
            qualified = [_join(name, r) for r in relative]
            found.append(_make_branch(model, qualified[0], qualified, positions))
    return found


def unrecognised_blocks(model: nn.Module) -> list[str]:
    """Blocks that look like ones the built-in rules know, but are not recognised, each with the reason.

    Either the class is a recognised one but the block lacks a module its rule needs (so no branch of it is
    built: half a branch would cut the input gradient of the part left out while its weights still train), or
    a class of a recognised name is defined outside the library the rule was checked on (Hugging Face
    remote code). Name such blocks' branches with ``branches=``.

    Example::

        >>> class GPT2Block(nn.Module):  # a copy, defined here rather than in transformers
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.ln_1, self.attn = nn.LayerNorm(2), nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return x + self.attn(self.ln_1(x))
        >>> [reason] = unrecognised_blocks(nn.Sequential(GPT2Block()))
        >>> reason.endswith("not transformers.models.gpt2.modeling_gpt2)")
        True
    """
    known = {name: module for rule in _RULES for module, name in rule.classes}
    found = []
    for name, module in model.named_modules():
        owner = _forward_owner(module)
        if owner is None or owner.__name__ not in known:
            continue
        rule = _rule_for(module)
        if rule is None:
            found.append(f"{name!r} ({owner.__name__}, defined in {owner.__module__}, not {known[owner.__name__]})")
        elif _missing_members(module, rule):
            missing = ", ".join(repr(m) for m in _missing_members(module, rule))
            found.append(f"{name!r} ({owner.__name__} without {missing})")
    return found


def unrecognised_note(model: nn.Module, spec: BranchesSpec) -> str:
    """A sentence naming the blocks the built-in rules nearly recognise (empty if none, or with ``branches=``)."""
    if spec is not None:
        return ""
    missed = unrecognised_blocks(model)
    if not missed:
        return ""
    more = f" and {len(missed) - 3} more" if len(missed) > 3 else ""
    return (
        f" {len(missed)} block(s) look like ones the built-in rules know but are not recognised: "
        f"{', '.join(missed[:3])}{more}. A rule needs every module it names and the library's own class; name"
        " these blocks' branches with `branches=` (see docs/block-mode.md)."
    )


def describe_branches(model: nn.Module, branches: Sequence[Branch], spec: BranchesSpec = None) -> str:
    """One line saying which blocks block mode recognised, e.g. ``"24 branches in 12 GPT2Block"``.

    Example::

        >>> class Residual(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + self.fc(self.norm(x))
        >>> model = nn.Sequential(Residual(), Residual())
        >>> describe_branches(model, discover_branches(model, {"*.norm": ["fc"]}), {"*.norm": ["fc"]})
        '2 branches named by `branches=`'
    """
    if spec is not None:
        return f"{len(branches)} branches named by `branches=`"
    counts: dict[str, list[int]] = {}  # class name -> [blocks, branches]
    for name, module, _ in _matched_blocks(model):
        owner = _forward_owner(module)
        entry = counts.setdefault(owner.__name__ if owner is not None else type(module).__name__, [0, 0])
        entry[0] += 1
        entry[1] += sum(1 for branch in branches if name == "" or branch.name.startswith(f"{name}."))
    return ", ".join(f"{n} branches in {blocks} {cls}" for cls, (blocks, n) in counts.items()) or "no branches"


def _spec_error(spec: Any, problem: str, fix: str) -> ValueError:
    return ValueError(f"`branches`={spec!r}: {problem}. {fix}")


def _user_branches(model: nn.Module, spec: Mapping[str, Sequence[str]], positions: Mapping[str, int]) -> list[Branch]:
    example = ' e.g. branches={"blocks.*.norm1": ["attn", "ls1"]}'
    found = []
    claimed: dict[str, str] = {}  # entry -> the pattern that matched it
    for pattern, relatives in spec.items():
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(
                f"`branches` keys must be non-empty fnmatch patterns on entry module names, got {pattern!r} in"
                f" {spec!r};{example}."
            )
        if isinstance(relatives, str) or not isinstance(relatives, Sequence):
            raise TypeError(
                f"`branches`[{pattern!r}] must be a list of module names relative to the entry's parent block,"
                f" got {relatives!r};{example} (a list, even for one name)."
            )
        if not all(isinstance(r, str) and r for r in relatives):
            raise TypeError(f"`branches`[{pattern!r}] must hold non-empty module names, got {relatives!r};{example}.")
        entries = [name for name in positions if name and fnmatchcase(name, pattern)]
        if not entries:
            some = ", ".join(repr(n) for n in list(positions)[1:8])
            raise _spec_error(
                spec,
                f"the pattern {pattern!r} matches no module of {type(model).__name__}",
                f"Use qualified names as in model.named_modules() (e.g. {some}, ...).",
            )
        for entry in entries:
            if entry in claimed:
                raise _spec_error(
                    spec,
                    f"the module {entry!r} is matched by both {claimed[entry]!r} and {pattern!r}",
                    "Make the patterns match disjoint entry modules.",
                )
            claimed[entry] = pattern
            parent = entry.rpartition(".")[0]
            block = model.get_submodule(parent)
            qualified = [entry]
            for relative in relatives:
                if _submodule(block, relative) is None:
                    raise _spec_error(
                        spec,
                        f"the block {parent or type(model).__name__!r} of the entry {entry!r} has no module"
                        f" {relative!r}",
                        "Name the branch's modules relative to the entry's parent block (the entry itself"
                        " may be left out).",
                    )
                qualified.append(_join(parent, relative))
            found.append(_make_branch(model, entry, qualified, positions))
    return sorted(found, key=lambda branch: positions[branch.name])


def _check_disjoint(branches: Sequence[Branch], spec: Any) -> None:
    owner: dict[int, str] = {}
    for branch in branches:
        if not branch.parameters:
            raise _spec_error(
                spec,
                f"the branch {branch.name!r} (modules {list(branch.members)}) has no parameters",
                "Name the modules of the branch that hold its weights.",
            )
        for param in branch.parameters:
            other = owner.setdefault(id(param), branch.name)
            if other != branch.name:
                raise _spec_error(
                    spec,
                    f"the branches {other!r} and {branch.name!r} share a parameter",
                    "Each parameter may belong to one branch only; split or merge them.",
                )


def discover_branches(model: nn.Module, branches: BranchesSpec = None) -> list[Branch]:
    """List ``model``'s residual branches in ``named_modules()`` order of their entries.

    Args:
        model: The module to inspect.
        branches: ``None``: the built-in rules (torchvision ResNet BasicBlock
            and Bottleneck, timm ViT ``Block``/``ResPostBlock``, torchvision Swin V1/V2 blocks, Hugging
            Face GPT-2, BERT/RoBERTa and Llama-style decoder layers). A mapping
            ``{entry pattern: [module, ...]}``: for every module whose qualified name matches the
            ``fnmatch`` pattern, a branch entered through it, made of it and the listed modules, named
            relative to the entry's parent block; only these branches, no built-in ones. A callable
            ``model -> iterable of Branch``: exactly those branches (e.g. the built-in ones plus
            your own, made with :func:`branch_from_names`).

            A spec is a promise that the block computes ``skip(x) + F(x)`` with ``x`` entering ``F``
            only through the entry and nothing of ``F`` seen by ``skip``; LDB cannot check it.

    Returns:
        The branches, each parameter in at most one of them. Empty if nothing matched the built-in rules.

    Raises:
        TypeError: If ``branches`` is not one of the forms above.
        ValueError: If a pattern matches no module, two patterns match the same entry, a listed module
            does not exist, a branch has no parameters, or two branches share a parameter.

    Example::

        >>> class Residual(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm, self.fc = nn.LayerNorm(4), nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return x + self.fc(self.norm(x))
        >>> model = nn.Sequential(Residual(), Residual())
        >>> [b.name for b in discover_branches(model, {"*.norm": ["fc"]})]
        ['0.norm', '1.norm']
        >>> discover_branches(model)  # no built-in rule knows this block
        []
    """
    positions = {name: index for index, (name, _) in enumerate(model.named_modules())}
    if branches is None:
        found = _builtin_branches(model, positions)
    elif isinstance(branches, Mapping):
        found = _user_branches(model, branches, positions)
    elif callable(branches):
        found = list(branches(model))
        if not all(isinstance(branch, Branch) for branch in found):
            raise TypeError(
                f"`branches`={branches!r} returned {found!r}; a callable must return Branch objects (make them"
                " with lightning_ldb.branches.branch_from_names(model, entry, members))."
            )
    else:
        raise TypeError(
            f"`branches` must be None (built-in rules), a mapping {{entry pattern: [module names relative to the"
            f" block]}} or a callable model -> list of Branch, got {branches!r} of type {type(branches).__name__}."
        )
    _check_disjoint(found, branches)
    return found


def branch_from_names(model: nn.Module, entry: str, members: Sequence[str] = ()) -> Branch:
    """A branch of ``model`` from qualified module names, for a ``branches=`` callable.

    Args:
        model: The model the names refer to.
        entry: The qualified name of the entry module.
        members: The qualified names of the branch's other modules.

    Raises:
        ValueError: If a name is not a module of ``model``.

    Example::

        >>> model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))
        >>> branch_from_names(model, "0", ["1"]).members
        ('0', '1')
    """
    positions = {name: index for index, (name, _) in enumerate(model.named_modules())}
    for name in (entry, *members):
        if name not in positions or not name:
            raise ValueError(
                f"`branches`: {name!r} is not a submodule of {type(model).__name__}. Use qualified names as in"
                " model.named_modules()."
            )
    return _make_branch(model, entry, [entry, *members], positions)


def kept_layers(layers: Sequence[Layer], keep_first: int, keep_last: int) -> list[Layer]:
    """The layers ``keep_first``/``keep_last`` keep: exactly those weights mode never drops for them.

    The complement of the middle slice :func:`~lightning_ldb.layers.select_candidates` takes (layers marked
    ``observed=False`` are not counted, see :func:`~lightning_ldb.layers.split_kept`).

    Example::

        >>> from lightning_ldb.layers import discover_layers
        >>> model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(5)])
        >>> [layer.name for layer in kept_layers(discover_layers(model), keep_first=2, keep_last=1)]
        ['0', '1', '4']
    """
    return split_kept(layers, keep_first, keep_last)[0]


def select_branch_candidates(
    branches: Sequence[Branch],
    layers: Sequence[Layer],
    keep_first: int,
    keep_last: int,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> list[Branch]:
    """The branches that may be dropped, consistent with weights mode.

    ``keep_first``/``keep_last`` keep the same *layers* as in weights mode (counted over ``layers``,
    the list weights mode draws from, e.g. :func:`~lightning_ldb.layers.discover_layers` with the
    callback's granularity); a branch holding any parameter of a kept layer is never dropped. Of the
    rest, a branch is a candidate if its name matches one of ``include`` (all when None) and none of
    ``exclude`` (``fnmatch`` patterns on branch names).

    Example::

        >>> from lightning_ldb.layers import discover_layers
        >>> class Residual(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return x + self.fc(x)
        >>> model = nn.Sequential(nn.Linear(2, 2), Residual(), Residual(), Residual(), nn.Linear(2, 1))
        >>> branches = discover_branches(model, {"*.fc": []})
        >>> [b.name for b in select_branch_candidates(branches, discover_layers(model), 2, 1)]
        ['2.fc', '3.fc']
        >>> [b.name for b in select_branch_candidates(branches, discover_layers(model), 0, 0, exclude=["3.*"])]
        ['1.fc', '2.fc']
    """
    kept = {id(param) for layer in kept_layers(layers, keep_first, keep_last) for param in layer.parameters}
    return [
        branch
        for branch in branches
        if not any(id(param) in kept for param in branch.parameters)
        and (include is None or _matches(branch.name, include))
        and not (exclude and _matches(branch.name, exclude))
    ]
