"""Project code a user would write outside hanyeong: extensions through its public points only."""
