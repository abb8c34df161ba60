"""Build the Hidden Chow-Liu Tree (HCLT) circuit the paper uses, with a seeded parameter initialisation.

The tree comes from the exact mutual information of the token columns (trifle.models.circuits.structure);
``structure="pyjuice"`` keeps pyjuice's own binned estimator, only to measure what the exact one changes.
"""

from __future__ import annotations

import torch

from trifle.errors import ConfigError, DataError

from .structure import chow_liu_tree, mutual_information_matrix, tree_root


def validate_tokens(data: torch.Tensor, num_cats: int, *, name: str = "data") -> None:
    """Reject anything that is not a 2-D integer tensor of category ids in [0, num_cats).

    pyjuice indexes parameter tables with these ids without bounds checks, so a bad id would
    silently read another node's parameters instead of failing.
    """
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        shape = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise DataError(f"{name}: expected a 2-D tensor [num_samples, num_vars], got {shape}")
    if data.dtype.is_floating_point or data.dtype == torch.bool or data.dtype.is_complex:
        raise DataError(f"{name}: expected an integer tensor of category ids, got dtype {data.dtype}")
    if data.numel() == 0:
        raise DataError(
            f"{name}: expected at least one sample and one variable, got shape {tuple(data.shape)}"
        )
    lo, hi = int(data.min()), int(data.max())
    if lo < 0 or hi >= num_cats:
        raise DataError(
            f"{name}: category ids must lie in [0, {num_cats}) (num_cats), found range [{lo}, {hi}]"
        )


#: Ways to learn the HCLT's tree: exact plug-in MI of the categories (the default), or pyjuice's
#: min/max-rescaled Gaussian-binned estimate (made for pixels; wrong on token columns, kept to measure it).
STRUCTURES = ("exact-mi", "pyjuice")


def build_hclt(
    data: torch.Tensor, *, num_cats: int, num_latents: int, seed: int, structure: str = "exact-mi"
):
    """Learn the Chow-Liu tree from ``data`` and return pyjuice's HCLT root node set with initialised parameters.

    Parameters are initialised inside a forked RNG so the same seed gives the same circuit and the
    caller's global torch random state is left untouched.
    """
    import pyjuice
    from pyjuice.nodes.distributions import Categorical

    if not isinstance(num_cats, int) or num_cats < 2:
        raise ConfigError(f"num_cats: expected an integer >= 2, got {num_cats!r}")
    if not isinstance(num_latents, int) or num_latents < 1:
        raise ConfigError(f"num_latents: expected an integer >= 1, got {num_latents!r}")
    if structure not in STRUCTURES:
        raise ConfigError(f"pc.structure: expected one of {', '.join(STRUCTURES)}, got {structure!r}")
    validate_tokens(data, num_cats)
    if data.size(1) < 2:
        raise DataError(f"data: an HCLT needs at least 2 variables, got {data.size(1)}")
    data = data.long().cpu()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if structure == "pyjuice":
            root_ns = pyjuice.structures.HCLT(
                data, num_latents=num_latents, input_dist=Categorical(num_cats=num_cats)
            )
        else:
            from pyjuice.structures.compilation import BayesianTreeToHiddenRegionGraph

            tree = chow_liu_tree(mutual_information_matrix(data, num_cats))
            root_ns = BayesianTreeToHiddenRegionGraph(
                tree, tree_root(tree), num_latents, Categorical, {"num_cats": num_cats}
            )
        # pyjuice's default `visited` argument is a shared mutable set; pass a fresh one.
        root_ns.init_parameters(visited=set())
    return root_ns
