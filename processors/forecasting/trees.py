"""Regression trees as flat arrays, walked for many rows at once with numpy.

A gradient-boosted model (LightGBM) is exported once to a :class:`TreeEnsemble`: every
node of every tree in one set of arrays (split feature, threshold, two children, value).
A leaf is a node whose children are itself, so a walk of fixed depth needs no masks:
every (row, tree) pair takes ``depth`` gather-and-compare steps and lands on its leaf.
Predicting the 15 horizons of one step is then a handful of numpy calls per tree level
for all trees together, not one LightGBM call per row.  The ensemble is immutable and
holds no LightGBM object, so many forecasters can share one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from processors.forecasting.kernels import walk_trees

__all__ = ["TreeEnsemble"]


class TreeEnsemble:
    """Sum of regression trees over numeric features (``x <= threshold`` goes left).

    >>> t = TreeEnsemble.from_nodes([[(0, 0.5, 1, 2), 1.0, 3.0]], n_features=1, version=7)
    >>> t.predict(np.array([[0.2], [0.9]])).tolist(), t.version, t.depth
    ([1.0, 3.0], 7, 1)
    """

    __slots__ = ("_child", "_feature", "_roots", "_threshold", "_value", "depth",
                 "n_features", "n_trees", "offset_feature", "version")

    def __init__(self, feature: np.ndarray, threshold: np.ndarray, child: np.ndarray,
                 value: np.ndarray, roots: np.ndarray, depth: int, n_features: int,
                 version: int, offset_feature: int | None = None) -> None:
        n = len(feature)
        if not (len(threshold) == len(value) == n and child.shape == (n, 2)):
            raise ValueError("feature, threshold, value and child must describe the same nodes")
        if n and (child.min() < 0 or child.max() >= n or feature.max() >= n_features):
            raise ValueError("a child or feature index is out of range")
        # Node k is stored twice, at 2k and 2k + 1, and children as their doubled ids: a
        # step is then ``node = child[node + right]`` with no multiply.
        self._feature = np.repeat(np.asarray(feature, dtype=np.intp), 2)
        self._threshold = np.repeat(np.asarray(threshold, dtype=np.float64), 2)
        self._child = 2 * np.ascontiguousarray(child, dtype=np.intp).ravel()
        self._value = np.repeat(np.asarray(value, dtype=np.float64), 2)
        self._roots = 2 * np.ascontiguousarray(roots, dtype=np.intp)
        self.depth = int(depth)
        self.n_features = int(n_features)
        self.n_trees = len(self._roots)
        self.version = int(version)
        self.offset_feature = offset_feature

    @classmethod
    def from_nodes(cls, trees: list[Any], n_features: int, version: int,
                   offset_feature: int | None = None) -> TreeEnsemble:
        """Build from nested lists: a tree is a leaf value or ``[(feature, threshold,
        _, _), left, right]`` (the tuple's last two entries are ignored)."""
        feature: list[int] = []
        threshold: list[float] = []
        child: list[list[int]] = []
        value: list[float] = []

        def add(node: Any) -> tuple[int, int]:
            k = len(feature)
            feature.append(0)
            threshold.append(np.inf)
            child.append([k, k])
            value.append(0.0)
            if not isinstance(node, list):
                value[k] = float(node)
                return k, 0
            (f, thr, *_), left, right = node
            feature[k], threshold[k] = int(f), float(thr)
            (li, ld), (ri, rd) = add(left), add(right)
            child[k] = [li, ri]
            return k, 1 + max(ld, rd)

        roots, depth = [], 0
        for tree in trees:
            r, d = add(tree)
            roots.append(r)
            depth = max(depth, d)
        return cls(np.array(feature), np.array(threshold), np.array(child).reshape(-1, 2),
                   np.array(value), np.array(roots), depth, n_features, version,
                   offset_feature)

    @classmethod
    def from_lightgbm(cls, model: dict[str, Any], version: int,
                      offset_feature: int | None = None) -> TreeEnsemble:
        """Build from a LightGBM model dump (``Booster.dump_model()``): numeric splits
        only, trained without missing values (a NaN input goes left)."""
        def convert(node: dict[str, Any]) -> Any:
            if "leaf_value" in node:
                return float(node["leaf_value"])
            if node.get("decision_type", "<=") != "<=":
                raise ValueError("only numeric '<=' splits are supported")
            return [(node["split_feature"], node["threshold"], 0, 0),
                    convert(node["left_child"]), convert(node["right_child"])]

        trees = [convert(t["tree_structure"]) for t in model["tree_info"]]
        return cls.from_nodes(trees, int(model["max_feature_idx"]) + 1, version,
                              offset_feature)

    def __getstate__(self) -> dict[str, Any]:
        # The node arrays and labels.
        return {k: getattr(self, k) for k in self.__slots__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            if k != "_offsets":  # a per-row-count cache of earlier versions
                object.__setattr__(self, k, v)

    def with_version(self, version: int) -> TreeEnsemble:
        """The same trees under another version number (the arrays are shared)."""
        other = TreeEnsemble.__new__(TreeEnsemble)
        other.__setstate__({**self.__getstate__(), "version": int(version)})
        return other

    def same_trees(self, other: TreeEnsemble) -> bool:
        """Whether ``other`` holds the same trees (whatever its version)."""
        mine, theirs = self.__getstate__(), other.__getstate__()
        return all(np.array_equal(mine[k], theirs[k]) if isinstance(mine[k], np.ndarray)
                   else mine[k] == theirs[k] for k in mine if k != "version")

    @property
    def nbytes(self) -> int:
        """Bytes of the node arrays (the ensemble's size, shared by its users)."""
        return sum(a.nbytes for a in (self._feature, self._threshold, self._child,
                                      self._value, self._roots))

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Sum over the trees of each row's leaf value, ``X`` (rows, features) -> (rows,)."""
        F = X.shape[1]
        if self.n_features != F:
            raise ValueError(f"X: expected {self.n_features} features, got {F}")
        X = np.ascontiguousarray(X, dtype=np.float64)
        out: np.ndarray = walk_trees(X, self._roots, self._feature, self._threshold,
                                     self._child, self._value, self.depth)
        if self.offset_feature is not None:
            out += X[:, self.offset_feature]
        return out
