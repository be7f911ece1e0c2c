"""`python -m pipeline.predict`: classify new videos (the command: pipeline/serving/predict.py)."""

from pipeline.serving.predict import main

if __name__ == "__main__":
    main()
