"""Words a generated C identifier must not be (keywords, common macros, ``main``): the frontend
keeps them out of ONNX names it keeps, code generation out of every name it makes."""

C_KEYWORDS = set(
    "auto break case char const continue default do double else enum extern float for goto if inline int long "
    "register restrict return short signed sizeof static struct switch typedef union unsigned void volatile while "
    "_Bool _Complex _Imaginary bool true false NULL main".split()
)
