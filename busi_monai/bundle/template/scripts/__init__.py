# Bundle scripts: `networks` (generated from busi_monai/model/networks.py at export) and `transforms`.
