# Bundle scripts: `networks` (generated from busi_monai/networks.py at export) and `transforms`.
