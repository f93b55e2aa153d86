"""Regenerate the quickstart's demo preference set, deterministically.

Task: answer "What is the capital of X?" with the city name alone. The chosen reply is the
capital; the rejected reply ignores the one-word instruction (a full sentence, as
SmolLM2-135M-Instruct tends to answer), names the wrong city, or repeats the country. Eval rows carry the correct
`answer` so a program can check greedy generations. Train and eval use disjoint countries.

    python scripts/make_demo_data.py  # writes data/capitals/{train,eval}.jsonl
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "United Kingdom": "London", "Ireland": "Dublin", "Belgium": "Brussels", "Netherlands": "Amsterdam",
    "Austria": "Vienna", "Switzerland": "Bern", "Poland": "Warsaw", "Czech Republic": "Prague",
    "Hungary": "Budapest", "Greece": "Athens", "Sweden": "Stockholm", "Norway": "Oslo", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Iceland": "Reykjavik", "Russia": "Moscow", "Ukraine": "Kyiv", "Romania": "Bucharest",
    "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "Slovakia": "Bratislava", "Slovenia": "Ljubljana",
    "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Turkey": "Ankara", "Egypt": "Cairo",
    "Morocco": "Rabat", "Algeria": "Algiers", "Tunisia": "Tunis", "Libya": "Tripoli", "Nigeria": "Abuja",
    "Ghana": "Accra", "Kenya": "Nairobi", "Ethiopia": "Addis Ababa", "Uganda": "Kampala", "Tanzania": "Dodoma",
    "South Africa": "Pretoria", "Zimbabwe": "Harare", "Zambia": "Lusaka", "Senegal": "Dakar", "Angola": "Luanda",
    "Sudan": "Khartoum", "Somalia": "Mogadishu", "Rwanda": "Kigali", "Madagascar": "Antananarivo",
    "China": "Beijing", "Japan": "Tokyo", "South Korea": "Seoul", "North Korea": "Pyongyang", "India": "New Delhi",
    "Pakistan": "Islamabad", "Bangladesh": "Dhaka", "Nepal": "Kathmandu", "Sri Lanka": "Colombo",
    "Afghanistan": "Kabul", "Iran": "Tehran", "Iraq": "Baghdad", "Syria": "Damascus", "Lebanon": "Beirut",
    "Jordan": "Amman", "Israel": "Jerusalem", "Saudi Arabia": "Riyadh", "Qatar": "Doha", "Kuwait": "Kuwait City",
    "Oman": "Muscat", "Yemen": "Sanaa", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Cambodia": "Phnom Penh",
    "Laos": "Vientiane", "Malaysia": "Kuala Lumpur", "Singapore": "Singapore", "Indonesia": "Jakarta",
    "Philippines": "Manila", "Mongolia": "Ulaanbaatar", "Kazakhstan": "Astana", "Uzbekistan": "Tashkent",
    "Australia": "Canberra", "New Zealand": "Wellington", "Fiji": "Suva", "Canada": "Ottawa",
    "United States": "Washington", "Mexico": "Mexico City", "Cuba": "Havana", "Jamaica": "Kingston",
    "Haiti": "Port-au-Prince", "Guatemala": "Guatemala City", "Honduras": "Tegucigalpa", "Nicaragua": "Managua",
    "Costa Rica": "San Jose", "Panama": "Panama City", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Ecuador": "Quito", "Peru": "Lima", "Bolivia": "La Paz", "Chile": "Santiago", "Argentina": "Buenos Aires",
    "Uruguay": "Montevideo", "Paraguay": "Asuncion", "Brazil": "Brasilia", "Albania": "Tirana",
    "Belarus": "Minsk", "Moldova": "Chisinau", "Georgia": "Tbilisi", "Armenia": "Yerevan", "Azerbaijan": "Baku",
    "Cyprus": "Nicosia", "Malta": "Valletta", "Luxembourg": "Luxembourg", "Bhutan": "Thimphu",
    "Myanmar": "Naypyidaw", "Mali": "Bamako", "Niger": "Niamey", "Chad": "N'Djamena", "Cameroon": "Yaounde",
}
KINDS = ("wrong", "both", "country")
QUESTIONS = [
    "What is the capital of {country}? Answer with the city name only.",
    "Name the capital city of {country}. Reply with one word or name, nothing else.",
]
SENTENCES = [
    "The capital of {country} is {city}.",
    "{city} is the capital city of {country}.",
    "Sure! The capital of {country} is {city}, which is also one of its largest cities.",
]


def make_pair(rng: random.Random, country: str, capital: str, wrong_kind: str) -> dict:
    """One preference pair; `wrong_kind` is 'verbose' (right city, ignores the format),
    'wrong' (one word, wrong city), 'both' (a sentence naming the wrong city) or 'country'
    (repeats the country instead of naming its capital)."""
    if wrong_kind == "country" and country == capital:  # Singapore, Luxembourg: no such mistake to make
        wrong_kind = "wrong"
    other = rng.choice([c for c in CAPITALS.values() if c != capital])
    city = capital if wrong_kind == "verbose" else other
    if wrong_kind in ("wrong", "country"):
        rejected = other if wrong_kind == "wrong" else country
    else:
        rejected = rng.choice(SENTENCES).format(country=country, city=city)
    return {"prompt": rng.choice(QUESTIONS).format(country=country), "chosen": capital, "rejected": rejected,
            "answer": capital}


def main(out: Path = Path(__file__).resolve().parent.parent / "data" / "capitals", n_eval: int = 40) -> None:
    rng = random.Random(0)
    countries = sorted(CAPITALS)
    rng.shuffle(countries)
    eval_countries, train_countries = countries[:n_eval], countries[n_eval:]
    train = [make_pair(rng, c, CAPITALS[c], kind) for c in train_countries for kind in KINDS]
    rng.shuffle(train)
    eval_rows = [make_pair(rng, c, CAPITALS[c], KINDS[i % len(KINDS)])
                 for i, c in enumerate(eval_countries)]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("eval", eval_rows)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} pairs to {out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
