from qlab.eval.metrics import main

main()
