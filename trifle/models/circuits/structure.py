"""The HCLT's backbone: a Chow-Liu tree from the exact (plug-in) mutual information of token columns.

pyjuice's ``structures.HCLT`` estimates pairwise mutual information after rescaling *all* columns by
one global min/max and soft-binning them into 32 Gaussian bins, an estimator made for pixel
intensities. On trajectory tokens it is badly wrong: Taxi's action column uses ids 0-5, rewards a few
ids, values 0-99 and the pad 100, so after the global rescaling the six actions fall into one or two
soft bins and MI(a_0; r_0) comes out near 0.016 nats where the exact plug-in value is about 0.25. The
tree then puts an action many edges away from its own reward, and no amount of EM can make the
circuit's p(r | s, a) depend on a (docs/circuits.md, "Structure").

The tokens are categorical, so the right estimate is the plug-in one over the categories that actually
occur:

    I(X; Y) = sum_{x,y} p(x, y) log( p(x, y) / (p(x) p(y)) ),

from the joint counts of every column pair (the pad category included: "the episode is over" is
information). The tree is the maximum spanning tree of these weights (Chow & Liu 1968), rooted at a
centre of the tree as pyjuice does, and the circuit is then built on it with pyjuice's own
construction (``BayesianTreeToHiddenRegionGraph``), so the rest of the pipeline is unchanged.
"""

from __future__ import annotations

import networkx as nx
import numpy as np
import torch


def mutual_information_matrix(
    data: torch.Tensor | np.ndarray, num_cats: int, *, bias_correction: bool = True
) -> np.ndarray:
    """Symmetric ``[V, V]`` matrix of mutual information (nats) between the columns of ``data``.

    ``data`` is ``[N, V]`` integer category ids in ``[0, num_cats)``. The diagonal holds each column's
    entropy. Without ``bias_correction`` this is the plug-in value, exact for the empirical
    distribution. The plug-in value of a pair of many-category columns is inflated by about
    (K_x - 1)(K_y - 1) / 2N (two 100-bin value columns and 20k rows: 0.25 nats, as much as a strong real
    dependency), which would pull high-cardinality columns together in the tree; the Miller-Madow
    correction, on by default, subtracts that first-order bias using the cells actually observed.
    """
    x = np.ascontiguousarray(torch.as_tensor(data).long().cpu().numpy())
    n, num_vars = x.shape
    # Compact each column to the categories it uses, so joint tables are as small as possible.
    compact, sizes = [], []
    for v in range(num_vars):
        _, inverse = np.unique(x[:, v], return_inverse=True)
        compact.append(inverse.astype(np.int64))
        sizes.append(int(inverse.max()) + 1 if n else 1)
    marginals = [np.bincount(c, minlength=k) / n for c, k in zip(compact, sizes, strict=True)]
    mi = np.zeros((num_vars, num_vars))
    for i in range(num_vars):
        pi = marginals[i]
        mi[i, i] = -float(np.sum(pi[pi > 0] * np.log(pi[pi > 0])))
        for j in range(i + 1, num_vars):
            ki, kj = sizes[i], sizes[j]
            joint = np.bincount(compact[i] * kj + compact[j], minlength=ki * kj).reshape(ki, kj) / n
            nz = joint > 0
            outer = np.outer(pi, marginals[j])
            value = float(np.sum(joint[nz] * np.log(joint[nz] / outer[nz])))
            if bias_correction:
                # Miller-Madow: the plug-in estimate exceeds the truth by about (cells - 1) / 2N per
                # entropy term; for a pair that is (K_xy - K_x - K_y + 1) / 2N with K the used cells.
                value -= (int(nz.sum()) - ki - kj + 1) / (2.0 * n)
            mi[i, j] = mi[j, i] = max(value, 0.0)
    del num_cats  # the ids are compacted per column; the vocabulary size does not enter the estimate
    return mi


def chow_liu_tree(mi: np.ndarray) -> nx.Graph:
    """Maximum-weight spanning tree of the mutual-information matrix (Kruskal on -MI, deterministic:
    ties go to the pair listed first, pairs listed in variable order)."""
    num_vars = mi.shape[0]
    graph = nx.Graph()
    graph.add_nodes_from(range(num_vars))
    for v in range(num_vars):
        for u in range(v):
            graph.add_edge(u, v, weight=-float(mi[u, v]))
    return nx.minimum_spanning_tree(graph)


def tree_root(tree: nx.Graph) -> int:
    """The root pyjuice's HCLT uses: the first centre of the tree (smallest eccentricity)."""
    return int(nx.center(tree)[0])


def tree_distance(tree: nx.Graph, u: int, v: int) -> int:
    """Number of edges between variables ``u`` and ``v`` in the tree (a diagnostic)."""
    return int(nx.shortest_path_length(tree, u, v))
