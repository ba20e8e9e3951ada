# Data for benchmarks/own_data/run.sh (issue 27): two real families, grouped into distributions.
import numpy as np, pandas as pd
from sklearn.datasets import load_digits
from palmerpenguins import load_penguins
d = load_digits(); X = d.images; y = d.target
tf = {"identity": lambda a: a, "flip_lr": lambda a: a[:, :, ::-1], "flip_ud": lambda a: a[:, ::-1, :],
      "invert": lambda a: 16 - a, "transpose": lambda a: a.transpose(0, 2, 1), "roll2": lambda a: np.roll(a, 2, axis=2)}
def table(names, idx):
    frames = []
    for n in names:
        img = tf[n](X[idx]).reshape(len(idx), 64)
        f = pd.DataFrame(img, columns=[f"p{j}" for j in range(64)]); f.insert(0, "digit", y[idx]); f.insert(0, "transform", n)
        frames.append(f)
    return pd.concat(frames)
table(["identity", "flip_lr", "flip_ud", "invert"], np.arange(0, 1200)).to_csv("digits_train.csv", index=False)
table(["transpose", "roll2"], np.arange(1200, len(X))).to_csv("digits_unseen.csv", index=False)
p = load_penguins().dropna()
p["group"] = p.island + "_" + p.year.astype(str)
p = p.drop(columns=["island", "year", "sex"])
p[p.group.str.endswith(("2007", "2008"))].to_csv("penguins_train.csv", index=False)
p[p.group.str.endswith("2009")].to_csv("penguins_unseen.csv", index=False)
print("ok")
