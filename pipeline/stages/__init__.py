"""One module per DVC stage: `main()` reads params.yaml, calls library functions, writes outputs."""
