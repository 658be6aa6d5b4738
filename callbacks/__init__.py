"""Training callbacks: side jobs that the LightningModule and the DataModule should not hold."""

from meloformer.callbacks.phase_switch import Phase, PhaseSwitchCallback
from meloformer.callbacks.sample_logger import SampleLogger

__all__ = ["Phase", "PhaseSwitchCallback", "SampleLogger"]
