"""Facts shared by every part of the project: channel order, statistics, class lists.

The channel order of every tensor in this project is ``CHANNELS = ("VH", "VV")``, the order of the
released checkpoints. Statistics are in dB.
"""
from __future__ import annotations

CHANNELS: tuple[str, ...] = ("VH", "VV")

# Per-data-set normalisation statistics in dB, order (VH, VV). The BENv1 std is the mean within-patch
# spread (the released code's convention); the BENv2 values were computed at 128 px over train+val.
DATASET_STATS: dict[str, dict[str, list[float]]] = {
    "benv1": {"mean": [-19.2309, -12.5951], "std": [3.1672, 2.9644]},
    "benv2": {"mean": [-19.1966, -12.5144], "std": [5.4501, 5.0019]},
    # SEN12-FLOOD is normalised with the BENv1 statistics, as in the released finetuning code.
    "sen12flood": {"mean": [-19.2309, -12.5951], "std": [3.1672, 2.9644]},
}

# Linear power below this is treated as no-data when converting to dB (SEN12-FLOOD is stored linear).
LINEAR_FLOOR: float = 1e-6

BEN_43_CLASSES: tuple[str, ...] = (
    "Continuous urban fabric",
    "Discontinuous urban fabric",
    "Industrial or commercial units",
    "Road and rail networks and associated land",
    "Port areas",
    "Airports",
    "Mineral extraction sites",
    "Dump sites",
    "Construction sites",
    "Green urban areas",
    "Sport and leisure facilities",
    "Non-irrigated arable land",
    "Permanently irrigated land",
    "Rice fields",
    "Vineyards",
    "Fruit trees and berry plantations",
    "Olive groves",
    "Pastures",
    "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland",
    "Moors and heathland",
    "Sclerophyllous vegetation",
    "Transitional woodland/shrub",
    "Beaches, dunes, sands",
    "Bare rock",
    "Sparsely vegetated areas",
    "Burnt areas",
    "Inland marshes",
    "Peatbogs",
    "Salt marshes",
    "Salines",
    "Intertidal flats",
    "Water courses",
    "Water bodies",
    "Coastal lagoons",
    "Estuaries",
    "Sea and ocean",
)

# The 19-class nomenclature in the order of the released checkpoints (NOT alphabetical).
BEN_19_CLASSES: tuple[str, ...] = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)

# 19-class index -> the 43-class indices it merges; 43-class 3-10, 30, 32 and 37 map to nothing.
BEN_19_FROM_43: tuple[tuple[int, ...], ...] = (
    (0, 1), (2,), (11, 12, 13), (14, 15, 16, 18), (17,), (19,), (20,), (21,), (22,), (23,), (24,),
    (25, 31), (26, 27), (28,), (29,), (33, 34), (35, 36), (38, 39), (40, 41, 42),
)

# 43-class index -> 19-class index (or None).
BEN_43_TO_19: tuple[int | None, ...] = tuple(
    next((j for j, src in enumerate(BEN_19_FROM_43) if i in src), None) for i in range(43)
)
