"""The small base every hanyeong package imports: the error types (`hanyeong.errors`) and files
written whole or not at all (`hanyeong.files`). It imports nothing of the project."""
