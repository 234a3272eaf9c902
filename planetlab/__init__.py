"""What every PlanetLab program shares and nothing else: the version (`--version`)
and the log format. The one package that plc/, agent/, kernel/ and sensors/ may all
import; it imports only the standard library (docs/dev/layering.md)."""
