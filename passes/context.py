"""PassContext: what every pass reads (the recipe, which graph piece it works on) and writes (what it did)."""

from __future__ import annotations

from dataclasses import dataclass, field

from fxquant.config import Recipe
from fxquant.quant.spec import QuantSpec
from fxquant.quant.taps import TapStore


@dataclass
class LayerRecord:
    """One quantized op of a prepared model, as the summary and bit plans see it."""

    name: str  # qualified name, e.g. "layer1.0.conv1" or "encoder.attn.matmul"
    op: str  # "Conv2d", "Linear", "conv2d" (functional), "matmul", ...
    piece: str  # path of the graph module that holds it ("" is the root graph)
    node: str  # node name inside that graph
    spec: QuantSpec
    weight_quantizer: str | None = None  # module path inside the piece
    activation_quantizers: list[str] = field(default_factory=list)
    role: str = ""  # "first", "last", "first+last" or ""


@dataclass
class PassRecord:
    name: str
    piece: str
    modified: bool
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class PassContext:
    """Shared by the passes of one prepare_qat call.

    ``piece`` names the graph being processed. When the model's own forward could not be traced, fxquant
    traces its children as separate pieces; ``resolve_first`` / ``resolve_last`` then say whether the
    first/last-layer rules apply in this piece (see passes.annotate).
    """

    recipe: Recipe
    piece: str = ""
    resolve_first: bool = True
    resolve_last: bool = True
    layers: dict[str, LayerRecord] = field(default_factory=dict)
    records: list[PassRecord] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    matched_rules: set[int] = field(default_factory=set)
    keep_float: frozenset[str] = frozenset()  # module paths the user listed in leaf_modules
    # module path → attention type (swapped attention modules): a rule's type also matches the layers inside
    attention_scopes: dict[str, str] = field(default_factory=dict)
    # The recipe's feature taps (recipe.features) record into one store shared by every piece;
    # tap_matches counts what each selector found, so that one matching nothing anywhere is an error.
    tap_store: TapStore = field(default_factory=TapStore)
    tap_matches: dict[str, int] = field(default_factory=dict)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def qualify(self, name: str) -> str:
        """A name inside the current piece, made global."""
        if not self.piece:
            return name
        return f"{self.piece}.{name}" if name else self.piece
