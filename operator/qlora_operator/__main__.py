from qlora_operator.main import run

run()
