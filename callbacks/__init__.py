"""Training callbacks: side jobs that the LightningModule and the DataModule should not hold."""

from meloformer.callbacks.phase_switch import Phase, PhaseSwitchCallback
from meloformer.callbacks.progress_lines import ProgressLines
from meloformer.callbacks.sample_logger import SampleLogger
from meloformer.callbacks.stop_checkpoint import StopCheckpoint, TrainingStopped

__all__ = ["Phase", "PhaseSwitchCallback", "ProgressLines", "SampleLogger", "StopCheckpoint", "TrainingStopped"]
