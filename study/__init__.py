"""The augmentation study: does adding synthetic X-rays to a classifier's training data change its
test AUROC? `experiment` runs the grid (`main.py experiment`, `main.py demo`): `generators` trains
and samples each generator per real fraction, `gate` judges each pool before it is used (realistic?
class-bearing?), `memorization` asks whether samples copy training images, `distances` measures
samples in the features of a real-data classifier, `stats` turns seeds and test patients into
intervals and verdicts, `report` writes report.md and summary.json. It imports the teaching tier
(ddpm, dcgan, data, fid, classify) and the training harness; nothing imports it but main.py.
"""
