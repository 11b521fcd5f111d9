"""Artifact paths that more than one step reads or writes, defined once."""

# download_data: the arrays and their manifest, under this artifact folder.
DATA_DIR = "data"
MANIFEST = "manifest.json"
ARRAY_NAMES = ("train_x", "train_y", "test_x", "test_y")
# The validation split, carved from the training images; absent in data written before it existed.
VAL_ARRAY_NAMES = ("val_x", "val_y")

# Plots every step writes go under this folder of its run.
PLOTS_DIR = "plots"

# train: the trained network.
WEIGHTS_DIR = "weights"
STATE_DICT = "state_dict.pt"
MODEL_CONFIG = "model_config.json"
SUMMARY = "model_summary.txt"
PYFUNC_MODEL = "model"
MODEL_ID_TAG = "model_id"  # train's run tag: the ID of the LoggedModel it logged
# evaluate's run tag: the ID of the LoggedModel it logged, train's network with its calibration,
# which main registers.
CALIBRATED_MODEL_TAG = "calibrated_model_id"

# find_lr: the metric that train reads when max_lr is not given.
SUGGESTED_LR_METRIC = "suggested_lr"

# evaluate: the tables main puts in the model card.
PER_CLASS_CSV = "per_class_accuracy.csv"
OOD_CSV = "ood.csv"

# evaluate: the metric main compares candidates on (validation), and the one it reports (test).
VAL_ACCURACY_METRIC = "val_accuracy"
TEST_ACCURACY_METRIC = "test_accuracy"
