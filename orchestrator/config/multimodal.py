"""Multimodal (vision/video) model options."""

from pydantic import BaseModel

from orchestrator.config.fields import not_yet

REASON = "multimodal models are not supported yet"


class MultimodalArgs(BaseModel):
    image_max_pixels: int = not_yet(768 * 768, "Maximum pixel count of an input image.", REASON, ge=1)
    image_min_pixels: int = not_yet(32 * 32, "Minimum pixel count of an input image.", REASON, ge=1)
    video_max_pixels: int = not_yet(256 * 256, "Maximum pixel count of an input video frame.", REASON, ge=1)
    video_min_pixels: int = not_yet(16 * 16, "Minimum pixel count of an input video frame.", REASON, ge=1)
    video_fps: float = not_yet(2.0, "Frames sampled per second of input video.", REASON, gt=0)
    video_maxlen: int = not_yet(128, "Maximum number of frames sampled from a video.", REASON, ge=1)
    freeze_vision_tower: bool = not_yet(True, "Freeze the vision tower when training a multimodal model.", REASON)
    freeze_multi_modal_projector: bool = not_yet(
        True, "Freeze the multimodal projector when training a multimodal model.", REASON
    )
    train_mm_proj_only: bool = not_yet(False, "Train only the multimodal projector.", REASON)
