from textstats import counts, words


def test_words_are_lower_cased_and_stripped_of_punctuation():
    assert words("Hello, World! Hello?") == ["hello", "world", "hello"]


def test_an_apostrophe_inside_a_word_keeps_it_whole():
    assert words("Don't stop 'til dawn.") == ["don't", "stop", "til", "dawn"]


def test_no_text_has_no_words():
    assert words("") == []
    assert words(" \n\t-- ") == []


def test_counts_add_up_to_the_number_of_words():
    text = "the cat and the hat and the bat"
    assert counts(text)["the"] == 3
    assert sum(counts(text).values()) == len(words(text))
