"""The network (the paper's Attention U-Net from MONAI blocks, the confidence gate, the averaged network) and its checkpoints."""
