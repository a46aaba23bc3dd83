"""The library's version: recorded in every manifest ("library") and in the manager's step records."""

VERSION = "0.1.0"
