"""
An inductor graph pass for the compiled CPU decode step: a matrix product with 2 to 4 rows, `x @ W.T`, computed as
`(W @ x.T).T`.

A decode step multiplies every weight by one row per sequence: 2 rows at batch 1 with guidance. For that shape, the
MKL build in PyTorch's CPU wheels runs `x @ W.T` (`nn.Linear`'s layout) two to three times slower than the same
product with the operands swapped, `W @ x.T`: measured on a 2-core AMD EPYC (AVX-512) with MKL 2024.2 at 2 rows, a
512 x 1376 weight took 464 us one way and 150 us the other, near the memory-bandwidth bound (one row is the same
speed either way; from 8 rows on the swap is slower). Swapping is exact in real arithmetic and changes only the order
of the sums.

It is a post-grad pass (`torch._inductor.config.post_grad_custom_post_pass`), so it runs on the traced ATen graph, where
`nn.Linear` is `mm(x, permute(W, [1, 0]))` (or `addmm(bias, ...)`), and leaves eager models alone.
"""

import torch
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass


aten = torch.ops.aten

# Rows of `x` to swap: at 2 rows the swap was 1.8x to 3.1x faster for three weight shapes, at 4 rows 1.5x for one and
# as fast (0.98x) for the other two; at 1 row MKL takes its matrix-vector kernel, and from 8 rows on the swap lost.
MIN_ROWS, MAX_ROWS = 2, 4


class FewRowMatmulPass(CustomGraphPass):
    """
    Rewrites `mm(x, permute(W, [1, 0]))` and `addmm(b, x, permute(W, [1, 0]))` (or `t(W)`) on CPU tensors, `x` with
    `MIN_ROWS` to `MAX_ROWS` rows (static), into `permute(mm(W, permute(x)))` (+ `b`), row-major like the product it
    replaces. Counts each rewrite in
    `torch._dynamo.utils.counters["inductor"]["pisces_few_row_matmul"]`.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
                continue
            if node.target is aten.addmm.default and node.kwargs:  # beta or alpha other than 1
                continue
            bias, (x, weight_t) = (None, node.args) if node.target is aten.mm.default else (node.args[0], node.args[1:])
            if not (self._few_rows_on_cpu(x) and self._is_transposed(weight_t)):
                continue
            with graph.inserting_before(node):
                x_t = graph.call_function(aten.permute.default, (x, [1, 0]))
                product = graph.call_function(aten.mm.default, (weight_t.args[0], x_t))
                result = graph.call_function(aten.permute.default, (product, [1, 0]))
                # Row-major as `mm` returns it: the graph's consumers (the views that split heads, and the graph's
                # outputs) were traced for that layout. Inductor fuses the copy into the consumer where there is one.
                result = graph.call_function(
                    aten.clone.default, (result,), {"memory_format": torch.contiguous_format}
                )
                if bias is not None:
                    result = graph.call_function(aten.add.Tensor, (result, bias))
            node.replace_all_uses_with(result)
            graph.erase_node(node)
            counters["inductor"]["pisces_few_row_matmul"] += 1
        graph.eliminate_dead_code()

    @staticmethod
    def _few_rows_on_cpu(x) -> bool:
        value = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
        if value is None or value.device.type != "cpu" or value.dim() != 2:
            return False
        rows = value.shape[0]
        return isinstance(rows, int) and MIN_ROWS <= rows <= MAX_ROWS

    @staticmethod
    def _is_transposed(weight_t) -> bool:
        if not isinstance(weight_t, torch.fx.Node) or weight_t.op != "call_function":
            return False
        # Inductor's post-grad graphs spell the transpose `permute`; graphs traced without its decompositions, `t`.
        return weight_t.target is aten.t.default or (
            weight_t.target is aten.permute.default and list(weight_t.args[1]) == [1, 0]
        )

    def uuid(self):
        # Part of inductor's FX graph cache key: a change to the rewrite must change it.
        return f"pisces-few-row-matmul-{MIN_ROWS}-{MAX_ROWS}-v1"


FEW_ROW_MATMUL = FewRowMatmulPass()
