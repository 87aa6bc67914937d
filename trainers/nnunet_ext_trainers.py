# The folder `nnunet-ext env` points nnUNet_extTrainer at. nnU-Net imports every module here under
# a throw-away name and drops it afterwards, so this module only re-exports the trainers of the
# installed package: the classes nnU-Net finds stay importable (and picklable) as nnunet_ext.trainers.*.
from nnunet_ext.trainers import *  # noqa: F401,F403
