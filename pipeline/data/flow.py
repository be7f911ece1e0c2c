"""Dense optical flow: how each sampled frame moves on to the next frame of the video.

The frames stage samples N frames spread over a clip, so two sampled frames are often a
third of a second apart; their difference (`motion: diff`) mixes motion with a change of
view. Flow is measured where motion is defined: between each sampled frame and the frame
that follows it in the video (OpenCV's Farnebäck method on the letterboxed grey frames, no
weights to download), as in two-stream networks (Simonyan & Zisserman, 2014).

Stored as uint8 like the frames, 2 channels (x and y): `FLOW_ZERO` is no motion and the ends
of the range are `max_speed` frame sides per second in either direction (faster motion is
clipped). Measured per second, not per video frame, so footage at 15 and 30 fps and frames of
any size give the same values for the same motion. A frame model on flow reads its frames
with the flow appended as channels 4-5 (`with_flow`): one uint8 array, which batching,
subsets of frames and mirroring handle like plain frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

FLOW_ZERO = 128  # the uint8 value of no motion; 1 and 255 are -max_speed and +max_speed
FLOW_HALF_RANGE = 127
FLOW_CHANNELS = 2  # x (to the right), y (downwards)
RGB_CHANNELS = 3


@dataclass(frozen=True)
class FlowSettings:
    """`frames.flow` without `enabled`: how flow is computed and scaled."""

    max_speed: float  # frame sides per second mapped to the ends of the uint8 range
    pyr_scale: float
    levels: int
    winsize: int
    iterations: int
    poly_n: int
    poly_sigma: float

    @classmethod
    def from_config(cls, flow_cfg: dict) -> FlowSettings | None:
        """The settings of `frames.flow`, or None when flow is off (`enabled: false`)."""
        if not flow_cfg or not flow_cfg.get("enabled"):
            return None
        fb = flow_cfg["farneback"]
        return cls(
            max_speed=float(flow_cfg["max_speed"]),
            pyr_scale=float(fb["pyr_scale"]),
            levels=int(fb["levels"]),
            winsize=int(fb["winsize"]),
            iterations=int(fb["iterations"]),
            poly_n=int(fb["poly_n"]),
            poly_sigma=float(fb["poly_sigma"]),
        )

    def as_config(self) -> dict:
        """The `frames.flow` section these settings come from (for a logged model's record)."""
        return {
            "enabled": True,
            "max_speed": self.max_speed,
            "farneback": {
                k: getattr(self, k)
                for k in ("pyr_scale", "levels", "winsize", "iterations", "poly_n", "poly_sigma")
            },
        }


def successor_indices(indices: np.ndarray, total: int) -> np.ndarray:
    """The frame after each sampled one (the last frame of the clip is its own successor:
    no motion is measured there)."""
    return np.minimum(np.asarray(indices) + 1, total - 1)


def frame_flow(frame: np.ndarray, successor: np.ndarray, settings: FlowSettings) -> np.ndarray:
    """Farnebäck flow from one RGB frame to the next (S x S x 3 uint8): S x S x 2 float32, in
    pixels per video frame."""
    first = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    second = cv2.cvtColor(successor, cv2.COLOR_RGB2GRAY)
    return cv2.calcOpticalFlowFarneback(
        first,
        second,
        None,
        settings.pyr_scale,
        settings.levels,
        settings.winsize,
        settings.iterations,
        settings.poly_n,
        settings.poly_sigma,
        0,
    )


def clip_flow(
    frames: np.ndarray, successors: np.ndarray, fps: float, settings: FlowSettings
) -> np.ndarray:
    """The flow of one clip's sampled frames towards their successors (both T x S x S x 3
    uint8) as T x S x S x 2 uint8 (see the module's docstring for the scale)."""
    if fps <= 0:
        raise ValueError("optical flow in frame sides per second needs the video's frame rate")
    size = frames.shape[1]
    pixels = np.stack([frame_flow(f, s, settings) for f, s in zip(frames, successors)])
    speed = pixels * (fps / size) / settings.max_speed  # frame sides/s, -1..1 in max_speed
    return encode_speed(speed)


def encode_speed(speed: np.ndarray) -> np.ndarray:
    """Speeds as fractions of max_speed (any float array) -> uint8 around `FLOW_ZERO`."""
    return np.rint(FLOW_ZERO + FLOW_HALF_RANGE * np.clip(speed, -1, 1)).astype(np.uint8)


def decode_speed(flow: np.ndarray) -> np.ndarray:
    """uint8 flow -> float32 fractions of max_speed in -1..1."""
    return (flow.astype(np.float32) - FLOW_ZERO) / FLOW_HALF_RANGE


def with_flow(frames: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Frames (... x 3) and their flow (... x 2), both uint8, as one ... x 5 array."""
    if frames.shape[:-1] != flow.shape[:-1]:
        raise ValueError(f"frames {frames.shape} and flow {flow.shape} do not match")
    return np.concatenate([frames, flow], axis=-1)


def mirror_flow_channels(clips: np.ndarray, channel: int = RGB_CHANNELS) -> None:
    """In place: the flow of left-right mirrored clips (... x 5, flow in channels 4-5; or
    flow alone with `channel=0`) points the other way horizontally. 256 - v maps 1..255 onto
    itself and `FLOW_ZERO` onto itself."""
    clips[..., channel] = 256 - clips[..., channel].astype(np.int16)


def pooled_flow(flow: np.ndarray, grid: int) -> np.ndarray:
    """Each frame's flow averaged over a grid x grid layout of cells: ... x T x S x S x 2
    uint8 -> ... x T x (grid * grid * 2) float32 in -1..1 (a motion descriptor a sequence
    model reads next to each frame's features)."""
    lead, (size, _, channels) = flow.shape[:-3], flow.shape[-3:]
    frames = decode_speed(flow).reshape(-1, size, size, channels)
    cells = np.stack(
        [cv2.resize(f, (grid, grid), interpolation=cv2.INTER_AREA) for f in frames]
    )  # M x grid x grid x 2
    return cells.reshape(*lead, grid * grid * channels)
