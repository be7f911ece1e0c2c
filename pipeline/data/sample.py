"""The embedded sample: synthetic handball clips that differ by motion, not by appearance.

Each recording session (`KS`, `GR`, ...) has its own court (floor colour, texture, lines, goal
side), shared by every action recorded in it, as UNIRI-HBD's clips come from a few halls; each
scene draws its own two players (sizes, jersey colours) and a ball; the clips of a scene
(`_act1`, `_act2`, ...) share all of that and vary start position, speed, length, brightness
and noise. So neither the court nor the players tell the action apart. The class decides only *how* things
move: a runner crosses the court, a dribbler bounces the ball, a passer throws to the teammate,
a shooter throws at the goal, a jump-shooter runs, jumps and throws, two players cross paths
with a hand-off, a defender shuffles sideways with raised arms. Every frame holds the same
kinds of objects (two players, a ball, a goal), so a single frame gives away little.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pipeline.data.video import write_video
from pipeline.schema.sections import SampleSpec

log = logging.getLogger(__name__)


SESSIONS = ("KS", "GR", "RK", "ZG")


@dataclass
class Scene:
    """Everything that clips of one recording share."""

    background: np.ndarray  # H x W x 3 uint8, court with texture and lines
    goal_left: bool  # the goal is at the left edge (else right)
    goal_y: int
    player_height: int
    player_colour: tuple[int, int, int]
    teammate_height: int
    teammate_colour: tuple[int, int, int]
    skin_colour: tuple[int, int, int]
    ball_colour: tuple[int, int, int]
    floor_y: float  # fraction of the height where the main player's feet are


def _rng(*keys: object) -> np.random.Generator:
    """A generator seeded from stable hashes of the keys (independent of PYTHONHASHSEED)."""
    return np.random.default_rng([zlib.crc32(str(k).encode()) for k in keys])


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def make_scene(
    court_rng: np.random.Generator, rng: np.random.Generator, width: int, height: int
) -> Scene:
    """A scene on the court drawn from `court_rng` (one per session) with players, ball and
    camera details drawn from `rng` (one per scene)."""
    floor = court_rng.integers(40, 220, size=3).astype(np.float32)
    # Low-frequency texture: a coarse random grid upsampled, so scenes look distinct.
    coarse = court_rng.normal(0.0, 8.0, size=(4, 5, 3)).astype(np.float32)
    texture = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    background = np.clip(floor + texture, 0, 255).astype(np.uint8)
    line_colour = _colour(court_rng)
    for _ in range(int(court_rng.integers(1, 4))):
        y = int(court_rng.integers(height // 3, height))
        cv2.line(background, (0, y), (width - 1, y), line_colour, 1)
    cx = int(court_rng.integers(width // 4, 3 * width // 4))
    cv2.ellipse(background, (cx, height), (width // 3, height // 3), 0, 180, 360, line_colour, 1)
    goal_left = bool(court_rng.integers(0, 2))
    goal_y = int(court_rng.integers(height // 3, height // 2))
    gx0, gx1 = (0, width // 12) if goal_left else (width - width // 12 - 1, width - 1)
    cv2.rectangle(
        background, (gx0, goal_y - height // 6), (gx1, goal_y + height // 6), (235, 235, 235), 2
    )
    base = int(height * rng.uniform(0.45, 0.6))
    return Scene(
        background=background,
        goal_left=goal_left,
        goal_y=goal_y,
        player_height=base,
        player_colour=_colour(rng),
        teammate_height=int(base * rng.uniform(0.85, 1.15)),
        teammate_colour=_colour(rng),
        skin_colour=tuple(int(c) for c in rng.integers(90, 230, size=3)),
        ball_colour=_colour(rng),
        floor_y=float(rng.uniform(0.85, 0.95)),
    )


def draw_player(img, x, feet_y, h, colour, skin, leg_phase=0.0, arm_raise=0.0, arm_forward=0.0):
    """A stick-and-ellipse figure with its feet at (x, feet_y) and height h (pixels)."""
    x, feet_y = float(x), float(feet_y)
    hip_y = feet_y - 0.45 * h
    shoulder_y = feet_y - 0.8 * h
    head_r = max(2, int(0.1 * h))
    stride = 0.18 * h * np.sin(leg_phase)
    thick = max(2, int(h / 9))
    for sign in (1, -1):
        cv2.line(img, (int(x), int(hip_y)), (int(x + sign * stride), int(feet_y)), colour, thick)
    cv2.ellipse(
        img,
        (int(x), int((hip_y + shoulder_y) / 2)),
        (max(2, int(0.12 * h)), max(3, int(0.2 * h))),
        0,
        0,
        360,
        colour,
        -1,
    )
    cv2.circle(img, (int(x), int(shoulder_y - head_r)), head_r, skin, -1)
    # Arms: raise lifts the hands above the head, forward stretches them sideways.
    hand_y = shoulder_y + 0.3 * h - arm_raise * 0.6 * h
    for sign in (1, -1):
        hand_x = x + sign * (0.15 * h + arm_forward * 0.2 * h)
        cv2.line(img, (int(x), int(shoulder_y)), (int(hand_x), int(hand_y)), skin, thick)
    return (x + 0.2 * h, hand_y)  # position of the right hand


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * float(np.clip(t, 0.0, 1.0))


@dataclass(frozen=True)
class ClipLayout:
    """What one clip's random draws fix: speed, direction, where the players, the loose ball
    and the goal are, and sizes, in pixels of a `width` x `height` frame."""

    speed: float
    direction: int
    start_x: float
    floor: float
    mate_x: float
    mate_floor: float
    loose_ball: tuple[float, float]
    goal: tuple[float, float]
    width: int
    height: int
    h: int  # the main player's height
    mh: int  # the teammate's
    phase0: float


@dataclass
class Pose:
    """Both players' positions, limbs and the ball at one instant (ball None: in the main
    player's hand)."""

    px: float
    py: float
    mx: float
    my: float
    leg: float
    raise_: float = 0.0
    forward: float = 0.0
    mate_raise: float = 0.0
    ball: tuple[float, float] | None = None


def pose_at(action: str, t: float, c: ClipLayout) -> Pose:
    """The pose of `action` a fraction `t` (0-1) of the way through the clip."""
    width, height, h, mh, phase0 = c.width, c.height, c.h, c.mh, c.phase0
    pose = Pose(c.start_x, c.floor, c.mate_x, c.mate_floor, phase0)
    if action == "running":
        pose.px = c.start_x + c.direction * c.speed * 0.7 * width * (t - 0.5)
        pose.leg = phase0 + 10 * np.pi * c.speed * t
        pose.ball = c.loose_ball
    elif action == "dribbling":
        pose.px = c.start_x + c.direction * c.speed * 0.15 * width * (t - 0.5)
        pose.leg = phase0 + 4 * np.pi * c.speed * t
        bounce = abs(np.sin(phase0 + 3 * np.pi * c.speed * t))
        pose.ball = (pose.px + c.direction * 0.25 * h, _lerp(c.floor, c.floor - 0.6 * h, bounce))
        pose.forward = 0.3
    elif action == "passing":
        throw = (t - 0.35) / 0.3
        pose.raise_ = 0.6 if t < 0.35 else 0.2
        pose.forward = 0.8 if 0.3 < t < 0.5 else 0.1
        hand = (pose.px + 0.2 * h, pose.py - 0.5 * h)
        catch = (pose.mx, pose.my - 0.6 * mh)
        pose.ball = (
            _lerp(hand[0], catch[0], throw),
            _lerp(hand[1], catch[1], throw) - 0.25 * h * np.sin(np.pi * np.clip(throw, 0, 1)),
        )
        pose.mate_raise = 0.6 if t > 0.5 else 0.0
    elif action in ("shot", "jump-shot"):
        release = 0.5 if action == "shot" else 0.6
        if action == "jump-shot":
            run = min(t, 0.35) / 0.35
            pose.px = c.start_x + (c.goal[0] - c.start_x) * 0.25 * run * c.speed
            pose.leg = phase0 + 6 * np.pi * min(t, 0.35)
            jump = np.clip((t - 0.35) / 0.45, 0, 1)
            pose.py = c.floor - 0.9 * h * np.sin(np.pi * jump)
        pose.raise_ = 1.0 if release - 0.25 < t < release + 0.05 else 0.2
        hand = (pose.px + 0.2 * h, pose.py - 1.0 * h * pose.raise_ - 0.3 * h)
        fly = (t - release) / 0.25
        pose.ball = (
            (hand[0], hand[1])
            if fly <= 0
            else (_lerp(hand[0], c.goal[0], fly), _lerp(hand[1], c.goal[1], fly))
        )
    elif action == "crossing":
        # Main player and teammate run diagonally across each other; ball handed over mid-way.
        pose.px = c.start_x + c.direction * c.speed * 0.35 * width * (t - 0.5)
        pose.mx = c.start_x - c.direction * c.speed * 0.35 * width * (t - 0.5)
        pose.my = _lerp(c.floor - 0.15 * height, c.floor - 0.02 * height, t)
        pose.leg = phase0 + 8 * np.pi * c.speed * t
        if t > 0.5:
            pose.ball = (pose.mx + 0.2 * mh, pose.my - 0.5 * mh)
    elif action == "defence":
        pose.px = c.start_x + 0.2 * width * np.sin(phase0 + 4 * np.pi * c.speed * t)
        pose.leg = phase0 + 8 * np.pi * c.speed * t
        pose.raise_, pose.forward = 1.0, 0.6
        pose.ball = c.loose_ball
    else:
        raise ValueError(f"the sample generator has no motion for action {action!r}")
    return pose


def render_clip(
    action: str,
    scene: Scene,
    rng: np.random.Generator,
    length: int,
    width: int,
    height: int,
    noise: float,
) -> list[np.ndarray]:
    """Frames (H x W x 3 uint8, BGR) of one clip of `action` in `scene`."""
    speed = rng.uniform(0.75, 1.3)
    direction = 1 if rng.integers(0, 2) else -1
    start_x = rng.uniform(0.25, 0.75) * width
    floor = scene.floor_y * height
    # the teammate stands well away from the main player, so a pass crosses the court
    mate_x = (start_x + rng.choice([-1, 1]) * rng.uniform(0.3, 0.45) * width) % width
    mate_floor = floor - rng.uniform(0.0, 0.1) * height
    loose_ball = (rng.uniform(0.1, 0.9) * width, floor - rng.uniform(0.0, 0.1) * height)
    goal = (0.03 * width if scene.goal_left else 0.97 * width, float(scene.goal_y))
    draws = (speed, direction, start_x, floor, mate_x, mate_floor, loose_ball, goal)
    brightness = rng.uniform(-20, 20)
    h, mh = scene.player_height, scene.teammate_height
    layout = ClipLayout(*draws, width, height, h, mh, phase0=rng.uniform(0, 2 * np.pi))
    frames = []
    for i in range(length):
        t = i / max(1, length - 1)
        img = scene.background.copy()
        pose = pose_at(action, t, layout)
        mate_leg = 8 * np.pi * t if action == "crossing" else 0.3 * np.sin(2 * np.pi * t)
        draw_player(
            img,
            pose.mx,
            pose.my,
            mh,
            scene.teammate_colour,
            scene.skin_colour,
            leg_phase=mate_leg,
            arm_raise=pose.mate_raise,
        )
        hand = draw_player(
            img,
            pose.px,
            pose.py,
            h,
            scene.player_colour,
            scene.skin_colour,
            leg_phase=pose.leg,
            arm_raise=pose.raise_,
            arm_forward=pose.forward,
        )
        bx, by = pose.ball if pose.ball is not None else hand
        cv2.circle(img, (int(bx), int(by)), max(4, h // 6), scene.ball_colour, -1)
        noisy = img.astype(np.float32) + brightness + rng.normal(0, noise, img.shape)
        frames.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return frames


def generate_sample(out_dir: Path, spec: SampleSpec, classes: list[str]) -> list[dict]:
    """Write the sample clips under `out_dir/<class>/` and return one manifest row per clip
    (`spec`: the schema has checked one count per class, each at least 1)."""
    per_scene = spec.clips_per_scene
    jobs = []
    for action in classes:
        n = spec.counts[action]
        for scene_idx in range((n + per_scene - 1) // per_scene):
            for act in range(1, min(per_scene, n - scene_idx * per_scene) + 1):
                jobs.append((action, scene_idx, act))
    rows = []
    scenes: dict[tuple[str, int], tuple[Scene, str]] = {}
    for action, scene_idx, act in tqdm(jobs, desc="sample clips", unit="clip"):
        if (action, scene_idx) not in scenes:
            srng = _rng(spec.seed, action, scene_idx, "scene")
            session = SESSIONS[int(srng.integers(len(SESSIONS)))]
            court = _rng(spec.seed, session, "court")
            scenes[(action, scene_idx)] = (
                make_scene(court, srng, spec.width, spec.height),
                session,
            )
        scene, session = scenes[(action, scene_idx)]
        crng = _rng(spec.seed, action, scene_idx, act, "clip")
        length = int(crng.integers(spec.min_length, spec.max_length + 1))
        frames = render_clip(action, scene, crng, length, spec.width, spec.height, spec.noise)
        rel = Path(action) / f"{action}_{session}_{scene_idx + 1}_act{act}.avi"
        (out_dir / action).mkdir(parents=True, exist_ok=True)
        write_video(out_dir / rel, frames, spec.fps)
        rows.append({"path": rel.as_posix(), "label": action})
    return rows
