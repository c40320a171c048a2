"""Fundus archives on disk: the BRSET-layout archive (`brset`), DeepEyeNet captions (`deepeyenet`), the
importer of other datasets' label files (`importer`) and the one parser of label cells they share (`cells`)."""
