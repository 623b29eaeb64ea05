"""From a BUSI folder to what training reads: the BUSI layout, near-duplicates, the one splitter, prepared datasets, packs, MONAI Label studies, image I/O, preprocessing, synthetic data."""
