"""One module per DVC stage: `main()` reads params.yaml, calls library functions, writes outputs.

Each is an entry point (`python -m pipeline.stages.<stage>`), and some import TensorFlow as
they load, so the package keeps TensorFlow's start-up lines out before any of them does.
"""

from pipeline.tensorflow_start import prepare_tensorflow

prepare_tensorflow()
