"""What a user would pick instead of a diffusion on digits: classical density models.

Same split, same dequantization and the same accounting as `sdec eval` (uniform
dequantization, y = 2x̃ - 1, BPD = -(log p(y) + D log 2)/(D ln 2) + log2 17): a diagonal
and a full-covariance Gaussian (maximum likelihood, closed form), a full-covariance Gaussian
mixture with 10 components and diagonal mixtures with 10 and 100 components (scikit-learn
GaussianMixture, EM from k-means, its default reg_covar = 1e-6 added to every covariance
diagonal), each fitted on dequantized training images (all 1437: 5 draws per image) and
scored on 10 dequantization draws per test image. The diffusions hold out 10 % of train
for validation; the baselines use all of it (nothing is selected on validation).
Writes results/digits_baselines.json and prints it.

    python bench/digits_baselines.py
"""
import datetime
import json
import math
import os
import platform
import time

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from sdec.runtime.bpd import prepare
from sdec.runtime.data import load_dataset


def model_space(x, draws, seed):
    g = torch.Generator().manual_seed(seed)
    ys = [prepare(x, 17, "center", g, torch.float64)[0].reshape(len(x), -1) for _ in range(draws)]
    return torch.cat(ys).numpy()


def bpd(logp, D):
    return float(np.mean(-(logp + D * math.log(2)) / (D * math.log(2)) + math.log2(17)))


def main():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    D = train.data[0].numel()
    ytr, yte = model_space(train.data, 5, 0), model_space(test.data, 10, 1)
    out = {"data": "digits", "D": D, "n_train": train.n, "n_test": test.n,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                       "threads": torch.get_num_threads()},
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    mean = ytr.mean(0)
    var = ytr.var(0)
    logp = (-0.5 * ((yte - mean) ** 2 / var).sum(1) - 0.5 * np.log(var).sum() - 0.5 * D * math.log(2 * math.pi))
    out["diag_gaussian_bpd"] = bpd(logp, D)
    cov = np.cov(ytr, rowvar=False, bias=True)
    L = np.linalg.cholesky(cov)
    z = np.linalg.solve(L, (yte - mean).T).T
    logp = -0.5 * (z ** 2).sum(1) - np.log(np.diag(L)).sum() - 0.5 * D * math.log(2 * math.pi)
    out["full_covariance_gaussian_bpd"] = bpd(logp, D)
    for kind, k in (("full", 10), ("diag", 10), ("diag", 100)):
        t0 = time.time()
        gmm = GaussianMixture(k, covariance_type=kind, random_state=0, max_iter=200).fit(ytr)
        out[f"{kind}_gmm_{k}_bpd"] = bpd(gmm.score_samples(yte), D)
        out[f"{kind}_gmm_{k}_converged"] = bool(gmm.converged_)
        out[f"{kind}_gmm_{k}_fit_seconds"] = round(time.time() - t0, 1)
    text = json.dumps(out, indent=2)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "digits_baselines.json"),
              "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
