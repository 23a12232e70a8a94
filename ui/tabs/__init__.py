"""One module per tab of the studio: `build(studio, app)` lays the tab out, wires its handlers to the
Studio's methods and returns the forms it generated ({name: ui.forms.Form})."""
