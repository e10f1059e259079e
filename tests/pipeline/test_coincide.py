"""coincide's formulas on hand-made inputs: transferability, density, capped quotas, greedy MMD^2, the budget."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from pipeline.strategies import SELECTORS
from pipeline.strategies.selectors.coincide import capped_quotas, density, mmd_greedy, transferability


def test_transferability_is_the_mean_cosine_to_the_other_centroids():
    r = 1 / np.sqrt(2)
    c = np.array([[1.0, 0.0], [0.0, 1.0], [r, r]])
    # S_0 = (0 + r) / 2, S_1 = (0 + r) / 2, S_2 = (r + r) / 2
    np.testing.assert_allclose(transferability(c), [r / 2, r / 2, r])
    assert transferability(c[:1]).tolist() == [0.0]


def test_density_is_the_mean_kernel_over_pairs_of_distinct_rows():
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    # ordered pairs: (0,1), (1,0) at distance 0 -> 1 each; four pairs with row 2 at squared distance 2
    assert density(x, 1.0) == pytest.approx((2 + 4 * np.exp(-2)) / 6, rel=1e-12)
    assert density(x[:1], 0.7) == 0.7


def test_quotas_are_largest_remainder_capped_at_cluster_size_with_the_excess_shared_again():
    # 10 by (0.5, 0.3, 0.2): 5, 3, 2; cluster 0 holds 1, so 4 are shared by (0.3, 0.2): 2.4, 1.6 -> 2 + 1, and the
    # last unit to the larger remainder (0.6): 2, 2 -> quotas 1, 5, 4
    assert capped_quotas(10, np.array([0.5, 0.3, 0.2]), np.array([1, 10, 10])).tolist() == [1, 5, 4]
    # 7 by thirds: 2.33 each -> 2, 2, 2 and one unit to the lowest index
    assert capped_quotas(7, np.full(3, 1 / 3), np.array([5, 5, 5])).tolist() == [3, 2, 2]
    # more than the rows: every row
    assert capped_quotas(50, np.array([0.9, 0.1]), np.array([3, 4])).tolist() == [3, 4]


def mmd2(x: np.ndarray, subset: list[int]) -> float:
    """MMD^2 between the rows `subset` and all rows of x under exp(-||a - b||^2), by explicit loops."""
    k = lambda a, b: np.exp(-np.sum((a - b) ** 2))  # noqa: E731
    s = [x[i] for i in subset]
    ss = np.mean([k(a, b) for a in s for b in s])
    cs = np.mean([k(a, b) for a in x for b in s])
    cc = np.mean([k(a, b) for a in x for b in x])
    return ss - 2 * cs + cc


def test_each_greedy_step_takes_the_row_that_minimises_mmd2_of_the_picked_rows():
    x = np.random.default_rng(0).standard_normal((7, 3)) * 0.6
    sq = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    order = mmd_greedy(np.exp(-sq), 4).tolist()
    for t in range(4):
        candidates = [j for j in range(7) if j not in order[:t]]
        best = min(candidates, key=lambda j: (round(mmd2(x, order[:t] + [j]), 12), j))
        assert order[t] == best
    # the greedy set is close to the best 4-subset (and far better than the worst)
    values = [mmd2(x, list(s)) for s in itertools.combinations(range(7), 4)]
    assert mmd2(x, order) <= min(values) + 0.25 * (max(values) - min(values))


def three_clusters(rng, sizes=(30, 20, 10), d=6):
    """Unit rows around three orthogonal directions, spreads 0.05, 0.3, 0.6; the last two closer to each other."""
    centers = np.eye(d)[:3]
    centers[2] = (centers[1] + 0.6 * centers[2]) / np.linalg.norm(centers[1] + 0.6 * centers[2])
    rows, truth = [], []
    for c, (n, spread) in enumerate(zip(sizes, (0.05, 0.3, 0.6))):
        v = centers[c] + spread * rng.standard_normal((n, d)) / np.sqrt(d)
        rows.append(v / np.linalg.norm(v, axis=1, keepdims=True))
        truth += [c] * n
    return np.concatenate(rows).astype(np.float32), np.array(truth)


def test_the_budget_follows_softmax_of_transferability_over_density(make_ctx):
    x, truth = three_clusters(np.random.default_rng(1))
    selector = SELECTORS.build("coincide", {"num_clusters": 3, "temperature": 0.5}, seed=0)
    sel = selector.select(make_ctx(len(x), train={"hidden": x}), 18)
    assert sel.indices.size == np.unique(sel.indices).size == 18
    # expected shares, computed here from the planted clusters
    groups = [x[truth == c] for c in range(3)]
    cent = np.array([g.mean(0) / np.linalg.norm(g.mean(0)) for g in groups])
    s = np.array([np.mean([cent[a] @ cent[b] for b in range(3) if b != a]) for a in range(3)])
    d = np.array([np.mean([np.exp(-np.sum((p - q) ** 2)) for i, p in enumerate(g) for j, q in enumerate(g) if i != j])
                  for g in groups])
    p = np.exp(s / (0.5 * d))
    p /= p.sum()
    exact = 18 * p
    got = np.bincount(truth[sel.indices], minlength=3)
    assert np.abs(got - exact).max() < 1  # largest remainder: each within one of its exact share
    assert got[2] > got[0]  # the diverse, transferable cluster outweighs the dense one, though it is the smallest


def test_dataflex_coincide_entry_translates(tmp_path):
    import yaml

    from pipeline.config import load_config

    components = Path(__file__).parent / "data" / "dataflex_1_1_0_components.yaml"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "demo_out/model", "dataset": "a", "output_dir": "out",
                                    "train_type": "dynamic_select", "component_name": "coincide",
                                    "components_cfg_file": str(components)}))
    cfg = load_config(path)
    # DataFlex 1.1.0's entry: seed 42, clustering_batch_size 8, clustering_max_iter 10, num_clusters 10000, ...
    assert cfg.flex.component == "coincide" and cfg.flex.component_seed == 42 and cfg.hidden.batch_size == 8
    assert cfg.flex.component_args == {"num_clusters": 10000, "kmeans_iters": 10, "temperature": 1.0,
                                       "single_member_density": 1.0}
    ignored = {w.split("parameter ")[1].split(" ")[0] for w in cfg.warnings if "DataFlex parameter" in w}
    assert {"'clustering_device'", "'density_chunk_size'", "'cache_dir'"} <= ignored
