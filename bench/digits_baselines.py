"""What a user would pick instead of a diffusion on digits: classical density models.

Same split, same dequantization and the same accounting as `sdec eval` (uniform
dequantization, y = 2x̃ - 1, BPD = -(log p(y) + D log 2)/(D ln 2) + log2 17): a
full-covariance Gaussian and diagonal Gaussian mixtures (scikit-learn), each fitted on
dequantized training images (5 draws per image) and scored on 10 dequantization draws per
test image. Prints one JSON object; results/digits_baselines.json holds a run.

    python bench/digits_baselines.py
"""
import json
import math
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
           "machine": f"{platform.machine()} {platform.processor() or ''} "
                      f"{torch.get_num_threads()} threads".strip()}
    mean = ytr.mean(0)
    cov = np.cov(ytr, rowvar=False)
    L = np.linalg.cholesky(cov)
    z = np.linalg.solve(L, (yte - mean).T).T
    logp = -0.5 * (z ** 2).sum(1) - np.log(np.diag(L)).sum() - 0.5 * D * math.log(2 * math.pi)
    out["full_covariance_gaussian_bpd"] = bpd(logp, D)
    for k in (10, 100):
        t0 = time.time()
        gmm = GaussianMixture(k, covariance_type="diag", random_state=0, max_iter=200).fit(ytr)
        out[f"diag_gmm_{k}_bpd"] = bpd(gmm.score_samples(yte), D)
        out[f"diag_gmm_{k}_fit_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
