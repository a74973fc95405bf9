"""The small base every hanyeong package imports: the error types (`hanyeong.errors`), files
written whole or not at all (`hanyeong.files`) and messages printed above progress bars
(`hanyeong.console`). It imports nothing of the project."""
