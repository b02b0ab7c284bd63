"""Accuracy, per-cluster metrics and the two baselines every evaluation reports:
a linear probe on frozen features and a single prompt + head on all private data."""

from __future__ import annotations

import numpy as np
import torch

from lmeraser.compute import Compute
from lmeraser.config import PromptParams
from lmeraser.models.backbone import features_of, preprocess
from lmeraser.training import cluster_seed, load_prompt, train_prompt
from lmeraser.workspace import InputSpec

SINGLE_PROMPT_ID = "all"  # seed namespace of the no-clusters baseline


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
    return float((labels == predictions).mean()) if len(labels) else float("nan")


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_cluster_accuracy(labels: np.ndarray, predictions: np.ndarray, routes: np.ndarray) -> dict[int, dict]:
    out = {}
    for cluster in np.unique(routes):
        rows = routes == cluster
        out[int(cluster)] = {"n_test": int(rows.sum()), "accuracy": accuracy(labels[rows], predictions[rows])}
    return out


def linear_probe(
    backbone, train_images, train_labels, test_images, spec: InputSpec, seed: int, compute: Compute
) -> np.ndarray:
    """Logistic regression on frozen CLS features; returns test predictions."""
    from sklearn.linear_model import LogisticRegression  # 0.5 s to import: only the baselines stage needs it

    train_features = features_of(backbone, train_images, spec, compute)
    test_features = features_of(backbone, test_images, spec, compute)
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    probe = LogisticRegression(max_iter=2000, C=1.0, random_state=seed)
    probe.fit((train_features - mean) / std, train_labels)
    return probe.predict((test_features - mean) / std)


@torch.no_grad()
def _predict(model, x: torch.Tensor, batch_size: int, compute: Compute) -> np.ndarray:
    out = []
    for i in range(0, len(x), batch_size):
        with compute.autocast():
            out.append(model(compute.put(x[i : i + batch_size])).argmax(1).cpu().numpy())
    return np.concatenate(out)


def single_prompt(
    backbone,
    train_images,
    train_labels,
    test_images,
    spec: InputSpec,
    params: PromptParams,
    num_classes: int,
    seed: int,
    compute: Compute,
    batch_size: int = 256,
) -> np.ndarray:
    """One prompt + head trained on all private data (the "no clusters" model); test predictions."""
    x = preprocess(train_images, spec)
    state = train_prompt(
        backbone,
        x,
        torch.from_numpy(np.array(train_labels, dtype=np.int64)),
        params,
        num_classes,
        cluster_seed(seed, SINGLE_PROMPT_ID),
        compute,
    )
    model = load_prompt(backbone, params, num_classes, state)
    return _predict(model, preprocess(test_images, spec), batch_size, compute)


POPULATION_MIA = (
    "population figure: loss-threshold attack over all forgotten samples vs the test split "
    "(per-sample evidence: forgetting_audit)"
)


def membership_inference(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> dict:
    """Loss-threshold attack (Yeom et al.): lower loss => "member".

    A population figure, not per-sample evidence (that is the forgetting audit's,
    lmeraser/audit/forgetting.py). AUC (scikit-learn's) is the probability that a random member
    scores above a random non-member (ties count half); TPR at 1% FPR uses the threshold that 1% of
    non-members exceed. An AUC near 0.5 on forgotten samples means the model treats them like data
    it never saw.
    """
    from sklearn.metrics import roc_auc_score

    members, others = -np.asarray(member_losses, float), -np.asarray(nonmember_losses, float)
    if len(members) == 0 or len(others) == 0:
        return {
            "auc": float("nan"),
            "tpr_at_1pct_fpr": float("nan"),
            "n_members": len(members),
            "n_nonmembers": len(others),
            "scope": POPULATION_MIA,
        }
    threshold = np.quantile(others, 0.99)
    return {
        "scope": POPULATION_MIA,
        "auc": float(roc_auc_score(np.r_[np.ones(len(members)), np.zeros(len(others))], np.r_[members, others])),
        "tpr_at_1pct_fpr": float((members > threshold).mean()),
        "n_members": int(len(members)),
        "n_nonmembers": int(len(others)),
    }
