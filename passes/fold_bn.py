"""fold_bn: fuse conv → batch norm pairs into ConvBn (recipe ``quant.bn = "fold"``).

Only a conv whose single user is a batch norm of matching width is fused; the batch norm keeps updating its
running statistics during training (see fxquant.layers.ConvBn). A no-op when the recipe keeps BN.
"""

from __future__ import annotations

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from fxquant.quant.layers import ConvBn

from .context import PassContext
from .patterns import module_of

_CONV_BN = {nn.Conv1d: nn.BatchNorm1d, nn.Conv2d: nn.BatchNorm2d, nn.Conv3d: nn.BatchNorm3d}


def fold_bn(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace ``conv → bn`` call_module pairs with one ConvBn module at the conv's path."""
    if ctx.recipe.quant.bn != "fold":
        return PassResult(gm, False)
    modified = False
    conv_uses: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            conv_uses[node.target] = conv_uses.get(node.target, 0) + 1
    for node in list(gm.graph.nodes):
        conv = module_of(gm, node)
        if type(conv) not in _CONV_BN or len(node.users) != 1 or conv_uses[node.target] != 1:
            continue
        bn_node = next(iter(node.users))
        bn = module_of(gm, bn_node)
        if type(bn) is not _CONV_BN[type(conv)] or conv_uses.get(bn_node.target) != 1:
            continue
        if not bn.track_running_stats or bn.num_features != conv.out_channels or bn_node.args[0] is not node:
            continue
        parent, _, name = str(node.target).rpartition(".")
        gm.get_submodule(parent).register_module(name, ConvBn(conv, bn))
        bn_node.replace_all_uses_with(node)
        gm.graph.erase_node(bn_node)
        modified = True
        ctx.note(f"folded {ctx.qualify(str(bn_node.target))} into {ctx.qualify(str(node.target))}")
    if modified:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return PassResult(gm, modified)
